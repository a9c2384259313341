"""The training loop: model, mesh, data, jitted step, periodic eval, checkpoints that resume exactly.

`train(config)` is what `jaxlm train --config ...` runs. It is the same on one CPU, one GPU, or a multi-host
TPU pod: the mesh comes from ``config.mesh``, every host feeds its own shard of the global batch, and only
the main process prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from jaxlm.checkpoint import Checkpointer
from jaxlm.config import RunConfig, to_dict
from jaxlm.data.pipeline import make_eval_batches, make_train_iterator
from jaxlm.errors import CheckpointError
from jaxlm.models.decoder import DecoderLM
from jaxlm.parallel.mesh import initialize_distributed, make_mesh
from jaxlm.parallel.sharding import shard_batch
from jaxlm.train.logging import MetricsLogger
from jaxlm.train.optim import make_optimizer
from jaxlm.train.step import create_train_state, make_eval_step, make_train_step

StepCallback = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass
class TrainResult:
    """What a finished run returns: the final state and the last logged train and eval metrics."""

    state: Any
    graphdef: Any
    last_step: int
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    output_dir: str


def checkpoint_directory(config: RunConfig) -> str:
    return config.checkpoint.directory or os.path.join(config.train.output_dir, "checkpoints")


def train(config: RunConfig, *, resume: bool = True, step_callback: StepCallback | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.data`` for ``config.train.steps`` optimizer steps.

    With ``resume`` and a checkpoint in the checkpoint directory, the run continues from the latest one:
    parameters, optimizer state, step and the data iterator's position are restored, so the next loss and
    the next batches are those an uninterrupted run would have seen. ``step_callback(step, metrics)`` runs
    after every step (tests use it to simulate a crash).
    """
    config.validate()
    initialize_distributed()
    mesh = make_mesh(config.mesh)
    model = DecoderLM(config.model, rngs=nnx.Rngs(config.train.seed))
    optimizer = make_optimizer(config.optimizer, nnx.state(model, nnx.Param), config.train.steps)
    graphdef, state, state_shardings = create_train_state(model, optimizer, mesh)
    _print_banner(config, mesh, model)
    del model
    train_step = make_train_step(graphdef, optimizer, mesh, config.train, state_shardings)
    eval_step = make_eval_step(graphdef, mesh, state_shardings, config.train)

    data_iterator = make_train_iterator(config.data)
    eval_batches = make_eval_batches(config.data, config.train.eval_batches) if config.train.eval_every else []
    checkpointer = Checkpointer.from_config(config.checkpoint, default_dir=checkpoint_directory(config))
    metadata = {"config": to_dict(config)}

    start_step = 0
    if resume and checkpointer.latest_step() is not None:
        state, start_step = _restore(checkpointer, state, data_iterator, config)

    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    # The mesh is current while steps trace, so tensor-parallel blocks find it (jaxlm.parallel.tp); the model
    # is built outside it (NNX creates params with logical axis names before they are mapped to mesh axes).
    with jax.set_mesh(mesh), MetricsLogger(config.train.output_dir, total_steps=config.train.steps) as logger:
        logger.truncate_after(start_step)
        try:
            for step in range(start_step + 1, config.train.steps + 1):
                batch = shard_batch(next(data_iterator), mesh)
                state, metrics = train_step(state, batch)
                if step % config.train.log_every == 0 or step == config.train.steps:
                    train_metrics = _to_floats(metrics)
                    logger.log(step, train_metrics, prefix="train")
                else:
                    logger.advance(step)
                if eval_batches and (step % config.train.eval_every == 0 or step == config.train.steps):
                    eval_metrics = evaluate(eval_step, state, eval_batches, mesh)
                    logger.log(step, eval_metrics, prefix="eval")
                checkpointer.save(step, train_state=state, data_state=data_iterator.get_state(), metadata=metadata,
                                  force=step == config.train.steps)
                if step_callback is not None:
                    step_callback(step, train_metrics)
        finally:
            # An interrupted run still finishes the saves already started; the last committed one survives.
            checkpointer.wait_until_finished()
            checkpointer.close()
    return TrainResult(state, graphdef, config.train.steps, train_metrics, eval_metrics, config.train.output_dir)


def _print_banner(config: RunConfig, mesh, model) -> None:
    """One line a person reads first: where the run is, what it trains, on what."""
    if jax.process_index() != 0:
        return
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    mesh_shape = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    print(f"jaxlm train: process_count={jax.process_count()} devices={jax.device_count()} "
          f"({jax.devices()[0].platform}) mesh({mesh_shape}) params={num_params:,} "
          f"mixers={'/'.join(config.model.mixer_pattern)} data={config.data.source} steps={config.train.steps} "
          f"output={config.train.output_dir}", flush=True)


def evaluate(eval_step, state, eval_batches, mesh) -> dict[str, float]:
    """Token-weighted loss and accuracy over the fixed held-out batches."""
    totals: dict[str, float] = {}
    for batch in eval_batches:
        sums = _to_floats(eval_step(state, shard_batch(batch, mesh)))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + value
    tokens = max(totals.pop("scored_tokens", 0.0), 1.0)
    result = {name.removesuffix("_sum"): value / tokens for name, value in totals.items()}
    result["perplexity"] = float(np.exp(min(result.get("loss", 0.0), 50.0)))
    return result


def _restore(checkpointer: Checkpointer, state, data_iterator, config: RunConfig):
    """Load the latest checkpoint into ``state``'s shardings and move ``data_iterator`` to where it was."""
    _check_same_model(checkpointer, config)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, data_state, _ = checkpointer.restore(abstract_train_state=abstract_state)
    data_iterator.set_state(data_state)
    return restored, int(jax.device_get(restored.step))


def _check_same_model(checkpointer: Checkpointer, config: RunConfig) -> None:
    """A checkpoint written by another model config is refused, naming the fields that differ."""
    saved_model = checkpointer.read_metadata().get("config", {}).get("model")
    current_model = json.loads(json.dumps(to_dict(config)["model"]))  # as saved: tuples become lists
    if saved_model is None or saved_model == current_model:
        return
    changed = sorted(k for k in current_model if saved_model.get(k) != current_model[k])
    raise CheckpointError(
        f"the checkpoint in {checkpointer.directory} was written by a different model: fields {changed} differ "
        f"(saved {[saved_model.get(k) for k in changed]}, now {[current_model[k] for k in changed]}); "
        "use another train.output_dir/checkpoint.directory or the saved model settings")


def _to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(metrics).items()}
