"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer", section 3.4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies ``w_i = theta^(-2i / D)`` for ``i = 0 .. D/2 - 1`` (float32, ``[D/2]``)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got head_dim={head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [D/2]
    return jnp.asarray(theta, jnp.float32) ** -exponents


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate feature pairs ``(i, i + D/2)`` of ``x`` by the angle ``p * w_i`` (rotate-half convention).

    With ``x1 = x[..., :D/2]``, ``x2 = x[..., D/2:]`` and ``a = p * w`` (see ``rope_frequencies``)::

        y1 = x1 cos(a) - x2 sin(a)
        y2 = x2 cos(a) + x1 sin(a)

    which is Hugging Face Llama's ``x * cos + rotate_half(x) * sin``, so its q/k weights import
    without permutation. Angles and the rotation are computed in float32; the result has x's dtype.

    Args:
      x: ``[B, T, H, D]`` queries or keys.
      positions: ``[B, T]`` integer absolute positions.
      theta: the RoPE base (10000 in Llama 2).
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rope expects x of shape [B, T, H, D], got {x.shape}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must have shape [B, T] = {x.shape[:2]}, got {positions.shape}")
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(x.shape[-1], theta)  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, D/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, D/2]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]  # [B, T, H, D/2] each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, T, H, D]
    return rotated.astype(x.dtype)
