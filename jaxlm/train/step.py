"""The jitted train and eval steps: masked token cross-entropy (+ z-loss), gradient accumulation.

The model is split once into a static ``graphdef`` and its ``nnx.Param`` state (trained, held in
``TrainState.params``); any other model variables are held constant (``model_state``). Every array
of the ``TrainState`` has an explicit sharding from the mesh, so one step function runs on one
device or on a (data x fsdp x tensor) mesh.

Loss over the global batch, with ``m`` the loss mask and ``N = sum(m)`` the scored tokens of ALL
micro-batches:

    loss      = sum_t m_t * CE(logits_t, target_t) / N
    z_loss    = z_loss_weight * sum_t m_t * logsumexp(logits_t)^2 / N
    objective = loss + z_loss
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.errors import require
from jaxlm.parallel.sharding import LOGICAL_AXIS_RULES, batch_sharding, state_shardings
from jaxlm.train.config import TrainConfig
from jaxlm.train.optim import current_learning_rate

Batch = Mapping[str, jax.Array]
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
# Unnormalised per-batch sums; each "<name>_sum" / scored_tokens is the metric "<name>".
SUM_KEYS = ("loss_sum", "z_loss_sum", "accuracy_sum", "scored_tokens")


@flax.struct.dataclass
class TrainState:
    """What changes every step: the update count, the params and the optimizer state."""

    step: jax.Array  # [] int32: optimizer updates applied so far
    params: nnx.State  # nnx.Param variables, float32
    opt_state: optax.OptState


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                       mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """``(graphdef, state, shardings)``: ``model``'s structure and its params placed on ``mesh``.

    Params are copied into their sharding from their logical axis names (the model's own arrays are
    left untouched, so the model stays usable after the state is donated); the optimizer state is
    created directly in its sharding (moments mirror their params, counters are replicated).
    ``shardings`` is a ``TrainState`` of ``NamedSharding``s. A model with non-param variables
    also needs ``model_state=nnx.state(model, nnx.Not(nnx.Param))`` in the step makers.
    """
    graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param)
    param_shardings = state_shardings(params, mesh)
    params = jax.device_put(params, param_shardings, may_alias=False)
    opt_shardings = state_shardings(jax.eval_shape(optimizer.init, params), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    return graphdef, TrainState(step=step, params=params, opt_state=opt_state), shardings


def token_loss_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                    z_loss_weight: float = 0.0) -> dict[str, jax.Array]:
    """Unnormalised masked sums over the tokens of one (micro-)batch (float32 scalars).

    With ``z_t = logsumexp(logits_t)`` and ``m`` the loss mask:
    ``loss_sum = sum_t m_t (z_t - logits_t[target_t])``, ``z_loss_sum = z_loss_weight sum_t m_t z_t^2``,
    ``accuracy_sum = sum_t m_t [argmax logits_t == target_t]``, ``scored_tokens = sum_t m_t``.
    """
    logits = logits.astype(jnp.float32)  # [b, T, V]
    mask = loss_mask.astype(jnp.float32)  # [b, T]
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [b, T]
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [b, T]
    is_correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [b, T]
    return {
        "loss_sum": jnp.sum(cross_entropy * mask),
        "z_loss_sum": z_loss_weight * jnp.sum(jnp.square(log_normalizer) * mask),
        "accuracy_sum": jnp.sum(is_correct * mask),
        "scored_tokens": jnp.sum(mask),
    }


def metrics_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``loss``, ``z_loss``, ``accuracy`` (each ``<name>_sum / max(N, 1)``) and ``scored_tokens`` N."""
    scored = jnp.maximum(sums["scored_tokens"], 1.0)
    metrics = {key.removesuffix("_sum"): sums[key] / scored for key in SUM_KEYS if key.endswith("_sum")}
    metrics["scored_tokens"] = sums["scored_tokens"]
    return metrics


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: Mesh,
                    config: TrainConfig, state_shardings: TrainState, *,
                    model_state: nnx.State | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jitted ``train_step(state, batch) -> (state, metrics)`` that donates ``state``.

    The global batch (arrays ``[B, T]`` keyed by ``BATCH_KEYS``) is split into
    ``config.grad_accum_steps`` micro-batches; a ``lax.scan`` sums their unnormalised objectives
    ``loss_sum + z_loss_sum`` and gradients, which are divided once by the batch's scored tokens
    ``N``, so accumulation computes the same update as the full batch. Metrics (float32 scalars):
    ``loss``, ``z_loss``, ``accuracy``, ``scored_tokens``, ``grad_norm`` (of the normalised
    gradient, before clipping) and ``learning_rate`` (the one this update used).
    """
    config.validate()
    forward_sums = _forward_sums_fn(graphdef, model_state, float(config.z_loss_weight))
    param_shardings = state_shardings.params

    def objective_sum(params, micro_batch):
        sums = forward_sums(params, micro_batch)
        return sums["loss_sum"] + sums["z_loss_sum"], sums

    grad_and_sums = jax.grad(objective_sum, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        def micro_step(micro_batch):
            grads, sums = grad_and_sums(state.params, micro_batch)
            return jax.lax.with_sharding_constraint(grads, param_shardings), sums

        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        grad_sum, sums = _sum_over_micro_batches(micro_step, (zero_grads, _zero_sums()), batch,
                                                 config.grad_accum_steps, mesh)
        scored = jnp.maximum(sums["scored_tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / scored, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = metrics_from_sums(sums)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = jnp.asarray(current_learning_rate(opt_state), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, state_shardings: TrainState,
                   config: TrainConfig | None = None, *,
                   model_state: nnx.State | None = None) -> Callable[[TrainState, Batch], dict]:
    """A jitted ``eval_step(state, batch) -> sums`` (keys ``SUM_KEYS``, float32 scalars).

    Sums add up over eval batches; ``metrics_from_sums`` turns the totals into metrics. The batch is
    processed in ``config.grad_accum_steps`` micro-batches like training, to bound memory, and the
    z-loss uses ``config.z_loss_weight`` (``config=None``: one micro-batch, no z-loss).
    """
    config = (config or TrainConfig()).validate()
    forward_sums = _forward_sums_fn(graphdef, model_state, float(config.z_loss_weight))

    def eval_step(state: TrainState, batch: Batch) -> dict:
        return _sum_over_micro_batches(lambda micro: forward_sums(state.params, micro), _zero_sums(), batch,
                                       config.grad_accum_steps, mesh)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding(mesh)), out_shardings=replicated)


def split_micro_batches(batch: Batch, num_micro_batches: int, mesh: Mesh) -> dict[str, jax.Array]:
    """``[B, ...]`` arrays -> ``[A, B / A, ...]`` with micro-batch ``i`` = rows ``i, i + A, i + 2A, ...``.

    Strided rows keep every micro-batch spread over all batch shards (each device holds a
    contiguous block of rows), so the split moves no data between devices when each shard's row
    count is a multiple of A.
    """
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, LOGICAL_AXIS_RULES["batch"]))
    micro_batches = {}
    for key, array in batch.items():
        rows = array.shape[0]
        require(rows % num_micro_batches == 0, "train.grad_accum_steps", num_micro_batches,
                f"a divisor of the global batch size {rows} (batch[{key!r}] has shape {array.shape})")
        strided = array.reshape(rows // num_micro_batches, num_micro_batches, *array.shape[1:])  # [B/A, A, ...]
        micro_batches[key] = jax.lax.with_sharding_constraint(jnp.swapaxes(strided, 0, 1), micro_sharding)
    return micro_batches


def _sum_over_micro_batches(fn: Callable[[Batch], Any], zeros: Any, batch: Batch, num_micro_batches: int,
                            mesh: Mesh) -> Any:
    """``sum_i fn(micro_batch_i)`` (a pytree sum) over the micro-batches of ``batch``, by ``lax.scan``."""

    def add_micro_batch(total, micro_batch):
        return jax.tree.map(jnp.add, total, fn(micro_batch)), None

    total, _ = jax.lax.scan(add_micro_batch, zeros, split_micro_batches(batch, num_micro_batches, mesh))
    return total


def _forward_sums_fn(graphdef: nnx.GraphDef, model_state: nnx.State | None,
                     z_loss_weight: float) -> Callable[[nnx.State, Batch], dict]:
    """``(params, micro_batch) -> token_loss_sums`` of the model rebuilt from ``graphdef``."""
    extra_states = () if model_state is None else (model_state,)

    def forward_sums(params: nnx.State, micro_batch: Batch) -> dict[str, jax.Array]:
        missing = [key for key in BATCH_KEYS if key not in micro_batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; a batch needs the keys {BATCH_KEYS}")
        try:
            model = nnx.merge(graphdef, params, *extra_states)
        except ValueError as error:
            raise ValueError(f"cannot rebuild the model from graphdef and params ({error}); a model with "
                             "non-param variables needs model_state=nnx.state(model, nnx.Not(nnx.Param))") from error
        logits = model(micro_batch["tokens"], positions=micro_batch["positions"],
                       segment_ids=micro_batch["segment_ids"])  # [b, T, V]
        return token_loss_sums(logits, micro_batch["targets"], micro_batch["loss_mask"], z_loss_weight)

    return forward_sums


def _zero_sums() -> dict[str, jax.Array]:
    return {key: jnp.zeros((), jnp.float32) for key in SUM_KEYS}
