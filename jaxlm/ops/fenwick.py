"""Fenwick (binary-counter) level structure of log-linear attention (Guo et al. 2025, section 3).

Key ``s`` is in level ``level(t, s)`` of query ``t``::

    level(t, s) = 0                          if s == t
                = 1 + floor(log2(t XOR s))   if s < t      (= bit_length(t XOR s) in both cases)

computed with integer ops only (count-leading-zeros), never a float log2. Level ``ℓ >= 1`` of query
``t`` is non-empty iff bit ``ℓ-1`` of ``t`` is 1, and then holds the keys whose bits above ``ℓ-1``
equal ``t``'s and whose bit ``ℓ-1`` is 0: the aligned half-block ``[(t >> ℓ) << ℓ, +2^{ℓ-1})``.

This module holds the integer level helpers, positions within packed segments, the per-level
read/write/reset masks of the chunked algorithm and the decode level stack (a binary counter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def num_levels(length: int) -> int:
    """Levels a sequence of ``length`` tokens needs: ``ceil(log2 length) + 1`` (1 for length 1)."""
    if length < 1:
        raise ValueError(f"sequence length must be >= 1 for log-linear attention, got {length}")
    return (length - 1).bit_length() + 1


def bit_length(x: jax.Array) -> jax.Array:
    """Number of bits of non-negative int32 ``x``: ``32 - clz(x)`` (0 for 0)."""
    x = x.astype(jnp.int32)
    return (32 - lax.clz(x)).astype(jnp.int32)


def fenwick_level(t: jax.Array, s: jax.Array) -> jax.Array:
    """``level(t, s) = bit_length(t XOR s)``: 0 on the diagonal, ``1 + floor(log2(t ^ s))`` below it."""
    return bit_length(jnp.bitwise_xor(t.astype(jnp.int32), s.astype(jnp.int32)))


def lowest_set_bit(t: jax.Array) -> jax.Array:
    """Index of the lowest set bit of positive int32 ``t`` (``lssb(t)``): ``bit_length(t & -t) - 1``."""
    t = t.astype(jnp.int32)
    return bit_length(jnp.bitwise_and(t, -t)) - 1


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` int32 position of each token inside its segment (0 where a new segment id starts).

    ``p_t = t - start(t)``, ``start(t)`` the last index ``<= t`` whose segment id differs from its left
    neighbour (index 0 always starts a segment).
    """
    length = segment_ids.shape[1]
    index = jnp.arange(length, dtype=jnp.int32)  # [T]
    previous = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :length]  # [B, T]
    starts = jnp.where(segment_ids != previous, index, 0)  # [B, T]
    return index - lax.cummax(starts, axis=1)


def level_masks(positions: jax.Array, segment_ids: jax.Array, level: int):
    """Per-token masks of level ``ℓ >= 1`` (token-granular form of the chunk rule of section 3.2).

    With ``b = ℓ - 1``: a token writes its key into the level-ℓ state iff bit ``b`` of its position is 0,
    reads the state iff bit ``b`` is 1, and the state resets where the bucket ``(segment, p >> ℓ)``
    changes. ``positions, segment_ids: [B, T]`` -> (``write, read, reset``: ``[B, T]`` bool).
    """
    bit = jnp.right_shift(positions, level - 1) & 1  # [B, T]
    bucket = jnp.right_shift(positions, level)  # [B, T]
    previous_bucket = jnp.pad(bucket, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    previous_segment = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    reset = (bucket != previous_bucket) | (segment_ids != previous_segment)  # [B, T]
    return bit == 0, bit == 1, reset


def merge_levels(levels: jax.Array, t: jax.Array) -> jax.Array:
    """Binary-counter carry of the decode level stack before step ``t`` (section 3.3).

    ``levels: [B, H, L, K, V]``, ``t: [B]``. For ``t >= 1`` with ``j = lssb(t)``:
    ``S^{(j+1)} += Σ_{ℓ<=j} S^{(ℓ)}`` and ``S^{(ℓ)} = 0`` for ``ℓ <= j`` (from the level definition: the
    keys in levels ``0 … j`` of ``t-1`` share bits ``>= j`` with ``t-1``, whose bit ``j`` is 0 while ``t``'s
    is 1). The target is clamped to ``L-1`` (exact while ``t < 2^{L-1}``). ``t == 0`` starts a sequence:
    the stack is cleared.
    """
    num_stack_levels = levels.shape[2]
    carry = jnp.minimum(lowest_set_bit(jnp.maximum(t, 1)), num_stack_levels - 1)  # [B]
    level_index = jnp.arange(num_stack_levels, dtype=jnp.int32)  # [L]
    merged_away = (level_index[None, :] <= carry[:, None]).astype(levels.dtype)  # [B, L]
    target = jax.nn.one_hot(jnp.minimum(carry + 1, num_stack_levels - 1), num_stack_levels,
                            dtype=levels.dtype)  # [B, L]
    merged = jnp.einsum("bl,bhlkv->bhkv", merged_away, levels)  # [B, H, K, V]
    kept = levels * (1.0 - merged_away)[:, None, :, None, None]
    carried = kept + target[:, None, :, None, None] * merged[:, :, None]  # [B, H, L, K, V]
    starting = (t == 0)[:, None, None, None, None]
    return jnp.where(starting, jnp.zeros_like(levels), carried)
