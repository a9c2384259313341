"""Short causal depthwise convolution, the token mixer in front of Mamba-2, Gated DeltaNet and PaTH.

    y[t, c] = bias[c] + Σ_{j=0..W-1} weight[j, c] · x[t - (W-1) + j, c]

with ``x`` before the sequence taken from ``initial_state`` (the last ``W-1`` inputs of the previous call,
zeros at the start). With ``segment_ids``, inputs of another segment count as zeros (packed sequences).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_conv1d(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, *,
                  initial_state: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``x [B, T, C]``, ``weight [W, C]`` -> (``y [B, T, C]``, ``final_state [B, W-1, C]``).

    ``final_state`` holds the last ``W-1`` inputs (older first), the ``initial_state`` of the next call.
    Accumulates in float32; ``y`` has ``x``'s dtype.
    """
    batch_size, length, channels = x.shape
    width = weight.shape[0]
    if weight.shape != (width, channels):
        raise ValueError(f"conv weight must be [width, channels={channels}], got {weight.shape}")
    if initial_state is None:
        initial_state = jnp.zeros((batch_size, width - 1, channels), x.dtype)
    padded = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    y = jnp.zeros((batch_size, length, channels), jnp.float32)
    for j in range(width):
        window = padded[:, j:j + length].astype(jnp.float32)  # x[t - (W-1) + j]  [B, T, C]
        if segment_ids is not None and j < width - 1:
            window = window * _same_segment(segment_ids, width - 1 - j)[..., None]
        y = y + window * weight[j].astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    final_state = padded[:, length:]  # [B, W-1, C]
    return y.astype(x.dtype), final_state


def causal_conv1d_step(state: jax.Array, x_t: jax.Array, weight: jax.Array,
                       bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One decode step: ``state [B, W-1, C]``, ``x_t [B, C]`` -> (``y_t [B, C]``, new state)."""
    window = jnp.concatenate([state.astype(x_t.dtype), x_t[:, None]], axis=1)  # [B, W, C]
    y = jnp.einsum("bwc,wc->bc", window.astype(jnp.float32), weight.astype(jnp.float32))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x_t.dtype), window[:, 1:]


def _same_segment(segment_ids: jax.Array, lag: int) -> jax.Array:
    """``[B, T]`` float: 1 where token ``t - lag`` exists and is in the same segment as token ``t``."""
    shifted = jnp.pad(segment_ids, ((0, 0), (lag, 0)), constant_values=-1)[:, : segment_ids.shape[1]]
    return (shifted == segment_ids).astype(jnp.float32)
