"""Normalisation functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Root-mean-square norm over the last axis (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * scale``.

    Llama order: the statistics and the normalisation run in float32, the normalised value is cast
    back to x's dtype and then multiplied by ``scale`` (cast to x's dtype). The result has x's dtype.

    Args:
      x: ``[..., d]`` activations.
      scale: ``[d]`` gain.
      eps: added to the mean square before the square root.
    """
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm scale must have shape {x.shape[-1:]} (last axis of x), got {scale.shape}")
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)  # [..., 1]
    normalised = (x32 * jax.lax.rsqrt(mean_square + eps)).astype(x.dtype)
    return normalised * scale.astype(x.dtype)
