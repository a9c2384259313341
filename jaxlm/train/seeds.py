"""Train one model configuration for several seeds at once (shared by the MQAR and state-tracking experiments).

The seeds' parameters are stacked on a leading seed axis ``S`` (``jaxlm.functional`` splits each model into
``(params, apply)``); one AdamW step (``jaxlm.train.optim.make_optimizer``) runs on every seed (``jax.vmap``,
all at once, or ``lax.map``, one after the other; see ``SEED_BATCHING``); a jitted call runs ``K`` steps with
``lax.scan`` and then predicts a held-out set. A configuration therefore compiles one program, whatever the
number of seeds and steps. Per seed ``s`` and step, with ``m`` the loss mask
(``jaxlm.train.step.token_loss_sums``):

    loss_s = Σ_t m_t CE(logits_{s,t}, target_t) / max(Σ_t m_t, 1)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm.errors import is_int, require
from jaxlm.models import DecoderLM, ModelConfig
from jaxlm.pure import functional
from jaxlm.train.config import OptimizerConfig
from jaxlm.train.optim import make_optimizer
from jaxlm.train.step import token_loss_sums

# How one program runs the seeds: "map" (lax.map, sequential) or "vmap" (batched). "vmap" is faster on an
# accelerator, but XLA:CPU (jax 0.10) crashes (segfault) on the vmapped gradient of the chunked SSD, so the
# trainer's default and the CPU presets use "map".
SEED_BATCHING = ("map", "vmap")


def over_seeds(fn: Callable, seed_batching: str) -> Callable:
    """``fn`` applied to every slice of its arguments' leading seed axis, results stacked on that axis."""
    require(seed_batching in SEED_BATCHING, "seed_batching", seed_batching, f"one of {SEED_BATCHING}")
    if seed_batching == "vmap":
        return jax.vmap(fn)
    return lambda *args: jax.lax.map(lambda sliced: fn(*sliced), args)


def stack_trees(trees: Sequence):
    """Stack equally shaped pytrees on a new leading axis: leaves ``[...]`` -> ``[len(trees), ...]``."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@dataclasses.dataclass
class SeedBatchedModel:
    """``params``: the seeds' ``nnx.Param`` state stacked ``[S, ...]``; ``apply(params_s, tokens) -> logits``
    for one seed; ``num_params``: parameter count of one model (embeddings included)."""

    params: nnx.State
    apply: Callable
    num_params: int
    num_params_without_embeddings: int


def build_seed_models(config: ModelConfig, seeds: Sequence[int]) -> SeedBatchedModel:
    """``DecoderLM(config)`` initialised from ``nnx.Rngs(seed)`` for every seed, parameters stacked."""
    require(len(seeds) > 0, "seeds", list(seeds), "at least one seed")
    models = [DecoderLM(config, rngs=nnx.Rngs(int(seed))) for seed in seeds]
    params = [functional(model)[0] for model in models]
    _, apply = functional(models[0])
    return SeedBatchedModel(stack_trees(params), apply, models[0].num_params(),
                            models[0].num_params(exclude_embeddings=True))


class SeedBatchedTrainer:
    """AdamW (warmup + cosine over ``total_steps``) on every seed at once, with a held-out evaluation after
    every call.

    ``train(params, opt_state, batches, eval_tokens)`` runs ``K`` steps on ``batches`` = ``{"tokens",
    "targets", "loss_mask"}`` each ``[K, S, B, T]``, then predicts the held-out ``eval_tokens [E, Be, T]``
    (the same for every seed, one batch at a time). It returns the new ``(params, opt_state)``, the losses
    ``[K, S]`` and every seed's argmax tokens ``[E, S, Be, T]`` int32. Evaluating inside the training call
    keeps each configuration at one compiled program.
    """

    def __init__(self, model: SeedBatchedModel, optimizer: OptimizerConfig, total_steps: int,
                 seed_batching: str = "map"):
        require(is_int(total_steps) and total_steps > 0, "steps", total_steps, "a positive integer")
        one_seed_params = jax.tree.map(lambda leaf: leaf[0], model.params)
        self.transform = make_optimizer(optimizer, one_seed_params, total_steps)
        apply, transform = model.apply, self.transform

        def mean_loss(params, batch):
            logits = apply(params, batch["tokens"])  # [B, T, V]
            sums = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
            return sums["loss_sum"] / jnp.maximum(sums["scored_tokens"], 1.0)

        def one_step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(mean_loss)(params, batch)
            updates, opt_state = transform.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        seeds_step = over_seeds(one_step, seed_batching)  # every argument and result has the seed axis first

        def predict_one_seed(params, tokens):
            return jnp.argmax(apply(params, tokens), axis=-1).astype(jnp.int32)  # [Be, T]

        def predict(params, tokens):
            return jax.vmap(predict_one_seed, in_axes=(0, None))(params, tokens)  # [S, Be, T]

        def train(params, opt_state, batches, eval_tokens):
            def body(carry, batch):
                params, opt_state, loss = seeds_step(*carry, batch)
                return (params, opt_state), loss

            (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), batches)  # losses [K, S]
            predictions = jax.lax.map(lambda tokens: predict(params, tokens), eval_tokens)  # [E, S, Be, T]
            return params, opt_state, losses, predictions

        self.init = jax.jit(jax.vmap(transform.init))
        self.train = jax.jit(train, donate_argnums=(0, 1))


def train_seeds(model: SeedBatchedModel, trainer: SeedBatchedTrainer, batch_chunks,
                eval_tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run every chunk of batches (each a dict of ``[K, S, B, T]`` host arrays) through ``trainer.train``.

    Returns the losses ``[steps, S]`` float32 and, after every chunk, the predictions ``[E, S, Be, T]`` of
    ``eval_tokens [E, Be, T]``.
    """
    params = jax.tree.map(jnp.copy, model.params)  # the model's own arrays stay usable (the train call donates)
    opt_state = trainer.init(params)
    eval_tokens = jnp.asarray(eval_tokens)
    losses, predictions = [], []
    for chunk in batch_chunks:
        chunk = {key: jnp.asarray(value) for key, value in chunk.items()}
        params, opt_state, chunk_losses, chunk_predictions = trainer.train(params, opt_state, chunk, eval_tokens)
        losses.append(np.asarray(chunk_losses))
        predictions.append(np.asarray(chunk_predictions))
    return np.concatenate(losses, axis=0), predictions


def make_trainer(model: SeedBatchedModel, train) -> SeedBatchedTrainer:
    """The trainer of an experiment's ``train`` config section (``steps``, ``learning_rate``, ``warmup_steps``,
    ``weight_decay``, ``seed_batching``); the other AdamW fields keep ``OptimizerConfig``'s defaults."""
    warmup_steps = min(train.warmup_steps, train.steps - 1)
    optimizer = OptimizerConfig(learning_rate=train.learning_rate, warmup_steps=warmup_steps,
                                weight_decay=train.weight_decay)
    return SeedBatchedTrainer(model, optimizer, train.steps, train.seed_batching)


def predictions_by_seed(predictions: np.ndarray) -> np.ndarray:
    """Held-out predictions ``[E, S, Be, T]`` of one call -> ``[S, E·Be, T]`` (rows in held-out order)."""
    num_batches, num_seeds, batch_size, length = predictions.shape
    return np.swapaxes(predictions, 0, 1).reshape(num_seeds, num_batches * batch_size, length)


def steps_per_call(steps: int, requested: int) -> int:
    """The steps of one jitted call: ``requested`` (capped at ``steps``), which must divide ``steps`` so
    every call has the same shape (one compile)."""
    chunk = min(requested, steps)
    require(is_int(steps) and steps > 0, "steps", steps, "a positive integer")
    require(steps % chunk == 0, "steps", steps, f"a multiple of the steps per jitted call ({chunk})")
    return chunk


def parameter_count(config: ModelConfig) -> int:
    """Parameters of ``DecoderLM(config)`` (embeddings included), from shapes only (nothing is initialised)."""
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param))))
