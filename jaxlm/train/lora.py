"""LoRA (Hu et al. 2021) for NNX models, as pure pytree operations over the params.

For each targeted kernel ``W [in, out]`` (or a stacked ``[L, in, out]`` of scanned layers) the adapter holds
``A [in, r]`` (random, std ``1/√in``) and ``B [r, out]`` (zeros), and the adapted kernel is

    W' = W + (α / r) · A @ B

so a fresh adapter leaves the model unchanged. Kernels are selected by name: a param path whose
module name is in ``LoraConfig.targets`` and whose leaf is ``kernel``. The model's layer modules are not
touched: ``merge_adapter`` returns new params and ``nnx.merge(graphdef, params, rest)`` rebuilds the model.
Training sees only the adapter pytree (the optimizer state is the adapter's alone); the base params are
an argument of the compiled step, never updated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm.errors import is_finite_number, is_int, require
from jaxlm.train.config import OptimizerConfig
from jaxlm.train.optim import make_optimizer
from jaxlm.train.step import metrics_from_sums, token_loss_sums

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
Adapter = dict[str, dict[str, jax.Array]]  # "path/to/kernel" -> {"a": [..., in, r], "b": [..., r, out]}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Fields: ``rank`` r, ``alpha`` α (the update is scaled by α/r), ``targets`` (module names whose
    ``kernel`` gets an adapter)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoraConfig":
        require(is_int(self.rank) and self.rank > 0, "lora.rank", self.rank, "a positive integer")
        require(is_finite_number(self.alpha) and self.alpha > 0, "lora.alpha", self.alpha, "a positive number")
        require(len(self.targets) > 0 and all(isinstance(t, str) for t in self.targets), "lora.targets",
                self.targets, "a non-empty tuple of module names, e.g. ('q_proj', 'v_proj')")
        return self


def pure_params(params: Any) -> dict:
    """A nested dict of arrays from an ``nnx.State`` (a dict is returned as it is)."""
    return params if isinstance(params, dict) else nnx.to_pure_dict(params)


def _flatten(tree: dict, prefix: tuple = ()) -> Iterable[tuple[tuple, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _path_name(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def target_kernels(params: Any, config: LoraConfig) -> dict[str, tuple]:
    """``{"path/name": path}`` of the kernels LoRA adapts; ConfigError when no param matches."""
    config.validate()
    found = {}
    for path, value in _flatten(pure_params(params)):
        if path[-1] == "kernel" and len(path) >= 2 and path[-2] in config.targets:
            require(np.ndim(value) in (2, 3), "lora.targets", config.targets,
                    f"modules with [in, out] or stacked [layers, in, out] kernels ({_path_name(path)} has "
                    f"shape {np.shape(value)})")
            found[_path_name(path)] = path
    require(bool(found), "lora.targets", config.targets, "names of projection modules present in the model "
            f"(e.g. {ATTENTION_PROJECTIONS + MLP_PROJECTIONS})")
    return found


def init_adapter(params: Any, config: LoraConfig, seed: int = 0) -> Adapter:
    """A fresh adapter: ``A ~ N(0, 1/in)`` of shape ``[..., in, r]`` and ``B = 0`` of shape ``[..., r, out]``.

    A is drawn on the host from ``numpy.random.default_rng(seed)`` (no device compilation per shape).
    """
    params = pure_params(params)
    shapes = {name: np.shape(_get(params, path)) for name, path in target_kernels(params, config).items()}
    return _fresh_adapter({name: ((*shape[:-1], config.rank), (*shape[:-2], config.rank, shape[-1]))
                           for name, shape in shapes.items()}, seed)


def reset_adapter(adapter: Adapter, seed: int) -> Adapter:
    """The same shapes, re-initialised as ``init_adapter`` does (new random A, zero B): between tasks."""
    return _fresh_adapter({name: (entry["a"].shape, entry["b"].shape) for name, entry in adapter.items()}, seed)


def _fresh_adapter(shapes: dict[str, tuple[tuple, tuple]], seed: int) -> Adapter:
    """``{name: {"a": N(0, 1/in) of a_shape, "b": zeros of b_shape}}``, names drawn in sorted order."""
    rng = np.random.default_rng(seed)
    adapter = {}
    for name in sorted(shapes):
        a_shape, b_shape = shapes[name]
        a = rng.standard_normal(a_shape).astype(np.float32) / np.sqrt(a_shape[-2])
        adapter[name] = {"a": jnp.asarray(a), "b": jnp.zeros(b_shape, jnp.float32)}
    return adapter


def adapter_delta(entry: dict[str, jax.Array], scale: float) -> jax.Array:
    """``(α/r) · A @ B``: ``[..., in, out]`` (a batched matmul for stacked kernels)."""
    return scale * jnp.einsum("...ir,...ro->...io", entry["a"], entry["b"])


def merge_adapter(params: Any, adapter: Adapter, config: LoraConfig, sign: float = 1.0) -> dict:
    """New params (nested dict) with ``W + sign · (α/r) A B`` for every adapted kernel; ``params`` unchanged."""
    params = pure_params(params)
    paths = target_kernels(params, config)
    require(set(adapter) <= set(paths), "adapter", sorted(set(adapter) - set(paths)),
            f"kernel paths of this model's LoRA targets {sorted(paths)}")
    merged = params
    for name, entry in adapter.items():
        kernel = _get(merged, paths[name])
        merged = _replace(merged, paths[name], kernel + sign * adapter_delta(entry, config.scale).astype(kernel.dtype))
    return merged


def unmerge_adapter(params: Any, adapter: Adapter, config: LoraConfig) -> dict:
    """Undo ``merge_adapter``: ``W' − (α/r) A B`` (equal to W up to float rounding)."""
    return merge_adapter(params, adapter, config, sign=-1.0)


def adapted_model(graphdef: nnx.GraphDef, params: Any, adapter: Adapter, config: LoraConfig,
                  rest: nnx.State | None = None) -> nnx.Module:
    """The model rebuilt from ``graphdef`` with the adapter merged into ``params`` (``rest``: non-param state)."""
    merged = nnx.State(_merge_jit(pure_params(params), adapter, config))
    return nnx.merge(graphdef, merged, *(() if rest is None else (rest,)))


_merge_jit = jax.jit(merge_adapter, static_argnames=("config", "sign"))


def _get(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: dict, path: tuple, value: Any) -> dict:
    """A copy of ``tree`` with the leaf at ``path`` replaced (only the dicts along the path are copied)."""
    copied = dict(tree)
    copied[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
    return copied


@functools.lru_cache(maxsize=16)
def _adapter_step(graphdef: nnx.GraphDef, config: LoraConfig, optimizer: OptimizerConfig, steps: int,
                  adapter_structure: Any) -> tuple[optax.GradientTransformation, Callable]:
    """``(transform, jitted step)`` shared by every trainer of the same model structure and settings, so
    training a fresh adapter per task compiles once."""
    shapes = jax.tree.unflatten(adapter_structure[0], [np.zeros(shape, np.float32) for shape in adapter_structure[1]])
    transform = make_optimizer(optimizer, shapes, steps)

    def loss_and_sums(adapter, base_params, rest, batch):
        model = nnx.merge(graphdef, nnx.State(merge_adapter(base_params, adapter, config)), rest)
        logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])  # [B, T, V]
        sums = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
        return sums["loss_sum"] / jnp.maximum(sums["scored_tokens"], 1.0), sums

    def step(adapter, opt_state, base_params, rest, batch):
        grads, sums = jax.grad(loss_and_sums, has_aux=True)(adapter, base_params, rest, batch)
        updates, opt_state = transform.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, metrics_from_sums(sums)

    return transform, jax.jit(step)


class AdapterTrainer:
    """Trains LoRA adapters of one model; the compiled step is shared by all trainers of equal settings.

    ``train(adapter, batches)`` runs ``steps`` AdamW updates (``optimizer`` schedule over ``steps``) of the
    masked next-token loss ``Σ m_t CE_t / Σ m_t`` (``jaxlm.train.step.token_loss_sums``) of the model
    with ``W + (α/r) A B``; only the adapter changes. Batches are dicts as ``jaxlm.train.sft.sft_batch``
    makes; one batch shape compiles once. Runs on the default device (no mesh).
    """

    def __init__(self, model: nnx.Module, config: LoraConfig, optimizer: OptimizerConfig, steps: int):
        require(is_int(steps) and steps > 0, "steps", steps, "a positive integer")
        self.config = config.validate()
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.base_params = pure_params(params)
        self.steps = steps
        leaves, structure = jax.tree.flatten(init_adapter(self.base_params, config))
        self.transform, self._step = _adapter_step(self.graphdef, self.config, optimizer.validate(), steps,
                                                   (structure, tuple(leaf.shape for leaf in leaves)))

    def train(self, adapter: Adapter, batches: Iterable[dict[str, np.ndarray]]) -> tuple[Adapter, list[dict]]:
        """``(trained adapter, per-step metrics)``; a fresh optimizer state for this adapter."""
        opt_state = self.transform.init(adapter)
        iterator, history = iter(batches), []
        for _ in range(self.steps):
            batch = {key: jnp.asarray(value) for key, value in next(iterator).items()}
            adapter, opt_state, metrics = self._step(adapter, opt_state, self.base_params, self.rest, batch)
            history.append(metrics)
        return adapter, [{name: float(value) for name, value in m.items()} for m in history]

    def model_with(self, adapter: Adapter) -> nnx.Module:
        """The base model with ``adapter`` merged (for generation)."""
        return adapted_model(self.graphdef, self.base_params, adapter, self.config, self.rest)
