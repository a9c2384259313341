"""The optimizer: AdamW with warmup + cosine learning rate, global-norm clipping, masked weight decay."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.errors import require
from jaxlm.train.config import OptimizerConfig

NO_WEIGHT_DECAY = "no_weight_decay"  # variable metadata key: True exempts a param from weight decay


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay.

    With peak ``lr``, warmup ``W``, decay end ``D`` (``config.decay_steps`` or ``total_steps`` when
    0) and ``r = min_lr_ratio``:

        lr(s) = lr * s / W                                                 for s < W
        lr(s) = lr * (r + (1 - r) * (1 + cos(pi * (s - W) / (D - W))) / 2)  for W <= s <= D
        lr(s) = lr * r                                                     for s > D
    """
    config.validate()
    require(isinstance(total_steps, int) and total_steps > 0, "train.steps", total_steps, "a positive integer")
    decay_end = config.decay_steps or total_steps
    require(decay_end > config.warmup_steps, "optimizer.warmup_steps", config.warmup_steps,
            f"fewer steps than the decay end {decay_end} (optimizer.decay_steps, or train.steps when it is 0)")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=decay_end,
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def weight_decay_mask(params: Any) -> Any:
    """True for params that get weight decay: ``ndim >= 2`` and not marked ``no_weight_decay``.

    ``params`` is an nnx state (leaves are ``nnx.Variable``s, whose metadata may carry
    ``no_weight_decay=True``) or a plain pytree of arrays. The mask has the same tree structure.
    """

    def decays(leaf):
        if isinstance(leaf, nnx.Variable):
            exempt = bool(leaf.get_metadata().get(NO_WEIGHT_DECAY, False))
            return leaf.replace(len(leaf.shape) >= 2 and not exempt)
        return jnp.ndim(leaf) >= 2

    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config: OptimizerConfig, params: Any, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (when ``grad_clip_norm > 0``) then AdamW on the schedule.

    AdamW: ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, ``p -= lr(t) (m_hat / (sqrt(v_hat) + eps)
    + wd * mask * p)``, with ``mask = weight_decay_mask(params)``. The moments are float32; the
    current learning rate is kept in the state as the hyperparameter ``learning_rate`` (read it with
    ``optax.tree_utils.tree_get(opt_state, "learning_rate")``).
    """
    config.validate()
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "mu_dtype"))(
        learning_rate=learning_rate_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=weight_decay_mask(params),
        mu_dtype=jnp.float32,
    )
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of the latest update, read from an optimizer state of ``make_optimizer``."""
    # The schedule's own state is also keyed "learning_rate"; the value is the one with a dtype.
    return optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=lambda _, value: hasattr(value, "dtype"))
