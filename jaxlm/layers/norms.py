"""Normalisation layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.ops.norms import rms_norm

if TYPE_CHECKING:
    from jaxlm.models.config import ModelConfig


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2) + eps) * scale`` over the model dimension; ``scale: [embed]`` starts at 1."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = config.norm_eps
        init = nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))
        self.scale = nnx.Param(init(rngs.params(), (config.d_model,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., d_model]`` -> same shape and dtype."""
        return rms_norm(x, self.scale[...], self.eps)
