"""Supervised fine-tuning: next-token loss on the tokens an example marks as learnable (e.g. assistant turns).

An example is a token sequence ``x_0 … x_{n−1}`` with a per-token flag ``learn_t``. The model reads
``x_0 … x_{n−2}`` and is scored on predicting ``x_t`` wherever ``learn_t`` is true:

    loss = Σ_t learn_t · CE(logits_{t−1}, x_t) / Σ_t learn_t      (t = 1 … n−1, summed over the batch)

``sft_batch`` turns examples into the trainer's batch arrays and ``fit`` runs the jitted train step of
``jaxlm.train.step`` (AdamW, warmup + cosine, clipping, gradient accumulation) on any mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxlm.errors import require
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import shard_batch
from jaxlm.train.config import MeshConfig, OptimizerConfig, TrainConfig
from jaxlm.train.optim import make_optimizer
from jaxlm.train.step import create_train_state, make_train_step

Example = tuple[Sequence[int], Sequence[bool]]


def sft_batch(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Batch arrays ``[B, seq_len]`` (keys of ``jaxlm.train.step.BATCH_KEYS``) from ``(tokens, learn)`` pairs.

    Row b holds ``tokens = x[:-1]``, ``targets = x[1:]``, ``loss_mask = learn[1:]``, positions
    ``0 … n−2`` and segment id 1, right-padded with ``pad_id`` (segment id 0, never scored). An example
    longer than ``seq_len + 1`` tokens is an error, never silently truncated.
    """
    require(len(examples) > 0, "examples", "[]", "at least one (tokens, learn) example")
    batch = {
        "tokens": np.full((len(examples), seq_len), pad_id, np.int32),
        "targets": np.full((len(examples), seq_len), pad_id, np.int32),
        "positions": np.zeros((len(examples), seq_len), np.int32),
        "segment_ids": np.zeros((len(examples), seq_len), np.int32),
        "loss_mask": np.zeros((len(examples), seq_len), np.float32),
    }
    for row, (tokens, learn) in enumerate(examples):
        tokens, learn = np.asarray(tokens, np.int32), np.asarray(learn, bool)  # [n], [n]
        require(tokens.ndim == 1 and tokens.shape == learn.shape, f"examples[{row}]",
                f"tokens {tokens.shape} / learn {learn.shape}", "1-D token and learn arrays of equal length")
        length = len(tokens) - 1
        require(1 <= length <= seq_len, f"examples[{row}]", f"{len(tokens)} tokens",
                f"2 to seq_len + 1 = {seq_len + 1} tokens (raise seq_len; examples are never truncated)")
        batch["tokens"][row, :length] = tokens[:-1]
        batch["targets"][row, :length] = tokens[1:]
        batch["positions"][row, :length] = np.arange(length)
        batch["segment_ids"][row, :length] = 1
        batch["loss_mask"][row, :length] = learn[1:]
    return batch


@dataclasses.dataclass
class FitResult:
    """The losses ``fit`` logged: ``history[i] = {"step": s, "loss": …, "accuracy": …, ...}``."""

    history: list[dict[str, float]]


def fit(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]], *, steps: int,
        optimizer: OptimizerConfig = OptimizerConfig(), train: TrainConfig | None = None,
        mesh: Mesh | None = None, log_every: int = 10, progress: bool = True,
        description: str = "sft") -> FitResult:
    """Train ``model``'s ``nnx.Param``s in place for ``steps`` optimizer steps on ``batches``.

    ``batches`` yields host-local batch dicts (e.g. from ``sft_batch``); each step takes the next one.
    ``optimizer`` sets AdamW and its schedule (the cosine decays over ``steps``); ``train`` sets gradient
    accumulation and z-loss (``train.steps`` is replaced by ``steps``); ``mesh`` defaults to all devices
    on the data axis. The metrics of every ``log_every``-th step and the last one are returned; a tqdm bar
    shows the loss while it runs.
    """
    require(isinstance(steps, int) and steps > 0, "steps", steps, "a positive integer")
    require(isinstance(log_every, int) and log_every > 0, "log_every", log_every, "a positive integer")
    train = dataclasses.replace(train or TrainConfig(), steps=steps)
    mesh = make_mesh(MeshConfig()) if mesh is None else mesh
    transform = make_optimizer(optimizer, nnx.state(model, nnx.Param), steps)
    graphdef, state, shardings = create_train_state(model, transform, mesh)
    train_step = make_train_step(graphdef, transform, mesh, train, shardings)
    history: list[dict[str, float]] = []
    batch_iterator: Iterator = iter(batches)
    show = progress and jax.process_index() == 0
    with tqdm(total=steps, desc=description, disable=not show, leave=False) as bar:
        for step in range(1, steps + 1):
            state, metrics = train_step(state, shard_batch(next(batch_iterator), mesh))
            if step % log_every == 0 or step == steps:
                record = {"step": step, **{name: float(value) for name, value in metrics.items()}}
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
            bar.update(1)
    nnx.update(model, state.params)
    return FitResult(history=history)
