"""SFT of a teaching model with a held-out validation split and best-checkpoint selection (early stopping).

Every model, whatever its teaching or training-set size, gets the same budget of ``steps`` optimizer
steps at ``batch_size`` dialogues (so a small training set is seen for many epochs). Every
``eval_every`` steps the model's own SFT loss is measured on a validation split (fresh dialogues
rendered in the SAME teaching as the training set, never the test set), and the parameters with the
lowest validation loss are the ones kept:

    kept = argmin_{s ∈ {eval_every, 2·eval_every, …, steps}} L_valid(θ_s),
    L_valid(θ) = Σ_t m_t · CE(logits_{t−1}(θ), x_t) / Σ_t m_t    (m: the assistant-turn mask)

The rule reads no test data and never compares the two teachings. The train step, eval step and
optimizer are ``jaxlm.train.step`` / ``jaxlm.train.optim`` (the same ones ``jaxlm.train.sft.fit`` runs);
examples are batched once with ``jaxlm.train.sft.sft_batch`` and then sliced, so large batches cost no
per-step Python work.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import is_int, require
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import shard_batch
from jaxlm.tasks.flights_dialogue import DIALOGUE_TOKENIZER, Dialogues, teaching_examples
from jaxlm.train.config import MeshConfig, OptimizerConfig, TrainConfig
from jaxlm.train.optim import make_optimizer
from jaxlm.train.sft import sft_batch
from jaxlm.train.step import create_train_state, make_eval_step, make_train_step, metrics_from_sums

Rows = dict[str, np.ndarray]  # the keys of jaxlm.train.step.BATCH_KEYS, arrays [N, T]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The SFT recipe shared by every (teaching, data size) pair.

    Fields: ``steps`` optimizer steps at ``batch_size`` dialogues; AdamW at peak ``learning_rate``
    after ``warmup_steps`` of linear warmup, cosine decay to ``min_lr_ratio`` of the peak at ``steps``,
    ``weight_decay`` on matrices; validation every ``eval_every`` steps on ``valid_dialogues`` fresh
    dialogues.
    """

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    eval_every: int
    valid_dialogues: int
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1

    def validate(self) -> "Recipe":
        for name in ("steps", "batch_size", "warmup_steps", "eval_every", "valid_dialogues"):
            value = getattr(self, name)
            require(is_int(value) and value > 0, f"recipe.{name}", value, "a positive integer")
        require(self.warmup_steps < self.steps, "recipe.warmup_steps", self.warmup_steps,
                f"fewer than recipe.steps={self.steps}")
        require(self.eval_every <= self.steps, "recipe.eval_every", self.eval_every,
                f"at most recipe.steps={self.steps}")
        return self

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                               weight_decay=self.weight_decay, min_lr_ratio=self.min_lr_ratio).validate()


def teaching_rows(dialogues: Dialogues, teaching: str) -> Rows:
    """All dialogues of one teaching as one ``sft_batch``: arrays ``[N, T]`` (every dialogue has length T + 1)."""
    examples = teaching_examples(dialogues, teaching)
    return sft_batch(examples, len(examples[0][0]) - 1, DIALOGUE_TOKENIZER.pad_id)


def shuffled_batches(rows: Rows, batch_size: int, seed: int) -> Iterator[Rows]:
    """Endless batches of ``batch_size`` rows, a fresh permutation every epoch (wrapping across epochs)."""
    require(is_int(batch_size) and batch_size > 0, "batch_size", batch_size, "a positive integer")
    num_rows = len(rows["tokens"])
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(num_rows)])
        chosen, order = order[:batch_size], order[batch_size:]
        yield {key: array[chosen] for key, array in rows.items()}


def padded_batches(rows: Rows, batch_size: int) -> Iterator[Rows]:
    """``rows`` in order, in batches of exactly ``batch_size``; the last is padded with unscored rows."""
    num_rows = len(rows["tokens"])
    for start in range(0, num_rows, batch_size):
        batch = {key: array[start:start + batch_size] for key, array in rows.items()}
        missing = batch_size - len(batch["tokens"])
        if missing:
            batch = {key: np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])
                     for key, array in batch.items()}  # zero loss mask: padding is never scored
        yield batch


def copy_tree(tree):
    """A copy of a pytree of device arrays (the train step donates its input state)."""
    return jax.tree.map(jnp.copy, tree)


def train_with_validation(model: nnx.Module, train_rows: Rows, valid_rows: Rows, recipe: Recipe,
                          seed: int) -> list[dict[str, float]]:
    """Train ``model`` in place by the module docstring's rule; it ends holding the kept (best) parameters.

    Returns one record per validation: ``{"step", "train_loss", "valid_loss", "valid_accuracy",
    "kept"}`` (train_loss: the mean over the steps since the last record; kept marks the chosen step).
    """
    recipe.validate()
    mesh = make_mesh(MeshConfig())
    transform = make_optimizer(recipe.optimizer(), nnx.state(model, nnx.Param), recipe.steps)
    graphdef, state, shardings = create_train_state(model, transform, mesh)
    train_step = make_train_step(graphdef, transform, mesh, TrainConfig(steps=recipe.steps), shardings)
    eval_step = make_eval_step(graphdef, mesh, shardings)
    batches = shuffled_batches(train_rows, recipe.batch_size, seed)
    history, train_losses = [], []
    best_loss, best_params = np.inf, None
    for step in range(1, recipe.steps + 1):
        state, metrics = train_step(state, shard_batch(next(batches), mesh))
        train_losses.append(metrics["loss"])
        if step % recipe.eval_every and step != recipe.steps:
            continue
        sums = [eval_step(state, shard_batch(batch, mesh)) for batch in padded_batches(valid_rows, recipe.batch_size)]
        valid = metrics_from_sums(jax.tree.map(lambda *parts: sum(parts), *sums))
        record = {"step": step, "train_loss": float(np.mean(jax.device_get(train_losses))),
                  "valid_loss": float(valid["loss"]), "valid_accuracy": float(valid["accuracy"]), "kept": False}
        train_losses = []
        if record["valid_loss"] < best_loss:
            best_loss, best_params = record["valid_loss"], copy_tree(state.params)
            for earlier in history:
                earlier["kept"] = False
            record["kept"] = True
        history.append(record)
    nnx.update(model, best_params)
    return history
