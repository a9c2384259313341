"""PaTH attention (Yang, Shen, Wen, Tan, Mishra, Ren, Panda, Kim 2025): position encoding by accumulated
Householder transformations, with the optional forget gate of PaTH-FoX.

Per token ``H_t = I − β_t w_t w_tᵀ`` (``w_t`` a unit direction, ``β_t ∈ (0, 2)``, one per KV head); query
``i`` of head h (KV head ``g = h // (H // G)``) sees key ``j ≤ i`` through

    s_ij = q_iᵀ H_i H_{i−1} … H_{j+1} k_j          (newest H next to q; s_ii = q_iᵀ k_i)
    o_i  = Σ_{j≤i} softmax_j(scale·s_ij + G_i − G_j) v_j,   G_t = Σ_{s≤t} log_f_s

(paper section 3; the gate in the PaTH-FoX form). ``impl="naive"`` carries every key through the
Householders one token at a time (O(T²·D), the readable reference); ``impl="blockwise"`` is the
FlashAttention-style algorithm of ``jaxlm.ops.path_blockwise``, with the linear-memory backward pass of
``jaxlm.ops.path_blockwise_vjp``. Decoding keeps the keys already carried
through every Householder so far (``path_prefill_keys`` builds them for a prompt, ``path_decode_step``
moves them on by one token).

Segments (``segment_ids [B, T]``, packed sequences) are contiguous runs of equal ids: a query only sees
keys of its own segment, so the Householders between them are those of that segment alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.path_blockwise import MASKED_LOGIT, accumulation_dtype, keys_to_sequence_end
from jaxlm.ops.path_blockwise_vjp import path_attention_linear_memory
from pallas_kernels.registry import kernels_unless_unsupported

PATH_IMPLS = ("naive", "blockwise", "pallas", "auto")


def path_attention(q: jax.Array, k: jax.Array, v: jax.Array, w: jax.Array, beta: jax.Array,
                   log_f: jax.Array | None = None, *, scale: float | None = None, impl: str = "blockwise",
                   block_size: int = 64, segment_ids: jax.Array | None = None,
                   backward_group_size: int = 4) -> jax.Array:
    """PaTH attention ``o_i = Σ_{j≤i} softmax_j(scale·q_iᵀ H_i … H_{j+1} k_j + G_i − G_j) v_j`` (module docstring).

    Args:
      q: ``[B, T, H, D]`` queries.
      k, v: ``[B, T, G, D]`` keys and values of G KV heads, ``H % G == 0``.
      w: ``[B, T, G, D]`` unit Householder directions.
      beta: ``[B, T, G]`` Householder strengths in (0, 2).
      log_f: ``[B, T, H]`` log forget gates (≤ 0) per query head, or None (no gate).
      scale: logit scale, default ``D ** -0.5``.
      impl: ``"naive"``, ``"blockwise"``, ``"pallas"`` (``pallas_kernels.path``: preprocessing, forward and
        backward Pallas kernels, interpret mode on CPU; head dim and block size powers of two >= 16, float32 or
        bfloat16 inputs) or ``"auto"`` (the kernels on a GPU when they take the inputs, else blockwise:
        ``pallas_kernels.registry.kernels_unless_unsupported``).
      block_size: tokens per block of the blockwise form (any T works: the tail is padded and masked).
      segment_ids: ``[B, T]`` int ids of contiguous packed segments; no attention across segments.
      backward_group_size: query blocks that share one scan of the blockwise backward pass (its memory is
        O(backward_group_size · block_size · T · D), linear in T; larger groups mean fewer sequential steps).

    Returns ``[B, T, H, D]`` in q's dtype; gates, Householders and softmax run in float32.
    """
    check_path_inputs(q, k, v, w, beta, log_f, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl not in PATH_IMPLS:
        raise ValueError(f"path_attention impl must be one of {PATH_IMPLS}, got {impl!r}")
    if impl == "naive":
        return naive_path_attention(q, k, v, w, beta, log_f, scale=scale, segment_ids=segment_ids)

    def kernels():
        from pallas_kernels.path import path_attention_pallas  # the kernels import jaxlm.ops for their backward

        return path_attention_pallas(q, k, v, w, beta, log_f, segment_ids, scale=scale, block_size=block_size,
                                     backward_group_size=backward_group_size)

    def blockwise():
        for name, value in (("block_size", block_size), ("backward_group_size", backward_group_size)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"path_attention {name} must be a positive integer, got {value!r}")
        return path_attention_linear_memory(q, k, v, w, beta, log_f, segment_ids, scale, block_size,
                                            backward_group_size)

    if impl == "pallas":
        return kernels()
    if impl == "blockwise":
        return blockwise()
    return kernels_unless_unsupported(kernels, blockwise)


def check_path_inputs(q, k, v, w, beta, log_f=None, segment_ids=None) -> None:
    """Raise ValueError naming the first argument whose shape does not fit ``q [B, T, H, D]``."""
    if q.ndim != 4:
        raise ValueError(f"path_attention q must be [B, T, H, D], got shape {q.shape}")
    batch_size, length, num_heads, dim = q.shape
    num_groups = k.shape[2] if k.ndim == 4 else -1
    for name, array in (("k", k), ("v", v), ("w", w)):
        if array.shape != (batch_size, length, num_groups, dim):
            raise ValueError(f"path_attention {name} must be [B, T, G, D] = {(batch_size, length, num_groups, dim)} "
                             f"(k's G, q's B, T, D), got {array.shape}")
    if num_heads % num_groups:
        raise ValueError(f"path_attention needs num query heads H={num_heads} to be a multiple of "
                         f"num KV heads G={num_groups}")
    if beta.shape != (batch_size, length, num_groups):
        raise ValueError(f"path_attention beta must be [B, T, G] = {(batch_size, length, num_groups)}, "
                         f"got {beta.shape}")
    if log_f is not None and log_f.shape != (batch_size, length, num_heads):
        raise ValueError(f"path_attention log_f must be [B, T, H] = {(batch_size, length, num_heads)} or None, "
                         f"got {log_f.shape}")
    if segment_ids is not None and segment_ids.shape != (batch_size, length):
        raise ValueError(f"path_attention segment_ids must be [B, T] = {(batch_size, length)} or None, "
                         f"got {segment_ids.shape}")


def naive_path_attention(q, k, v, w, beta, log_f=None, *, scale: float, segment_ids=None) -> jax.Array:
    """The reference form: a scan over query tokens i that first moves every earlier key past ``H_i``
    (``k_j ← H_i k_j``), writes the raw ``k_i``, then attends (``s_ij = q_i · k_j``). O(T²·D)."""
    batch_size, length, num_heads, dim = q.shape
    dtype = accumulation_dtype(q, k, v, w, beta, log_f)
    gate = jnp.zeros((batch_size, length, num_heads), dtype) if log_f is None else jnp.cumsum(
        log_f.astype(dtype), axis=1)  # G_t  [B, T, H]
    if segment_ids is None:
        segment_ids = jnp.zeros((batch_size, length), jnp.int32)
    slots = jnp.arange(length)

    def step(keys, inputs):
        q_t, k_t, w_t, beta_t, index = inputs
        keys = apply_householder(keys, w_t, beta_t)  # [B, T, G, D]; unwritten slots stay 0
        keys = keys.at[:, index].set(k_t)
        visible = (slots[None, :] <= index) & (segment_ids == segment_ids[:, index][:, None])  # [B, T]
        bias = gate[:, index][:, None, :] - gate  # G_i − G_j  [B, T, H]
        return keys, attend(q_t, keys, v.astype(dtype), visible, bias, scale)

    per_token = tuple(jnp.moveaxis(x.astype(dtype), 1, 0) for x in (q, k, w, beta))  # [T, B, ...]
    keys = jnp.zeros(k.shape, dtype)
    _, out = jax.lax.scan(step, keys, (*per_token, slots))  # [T, B, H, D]
    return jnp.moveaxis(out, 0, 1).astype(q.dtype)


def apply_householder(keys: jax.Array, w_t: jax.Array, beta_t: jax.Array) -> jax.Array:
    """``k_j ← (I − β_t w_t w_tᵀ) k_j`` for every slot: ``keys [B, S, G, D]``, ``w_t [B, G, D]``, ``beta_t [B, G]``."""
    projections = jnp.einsum("bsgd,bgd->bsg", keys, w_t)  # w_tᵀ k_j  [B, S, G]
    return keys - (beta_t[:, None, :] * projections)[..., None] * w_t[:, None]


def attend(q_t: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array, bias: jax.Array,
           scale: float) -> jax.Array:
    """One query token's softmax attention ``o = Σ_j softmax_j(scale·q·k_j + bias_j) v_j`` over visible slots.

    ``q_t [B, H, D]``, ``keys, values [B, S, G, D]``, ``visible [B, S]`` bool, ``bias [B, S, H]`` -> ``[B, H, D]``
    in the accumulation dtype.
    """
    batch_size, num_heads, dim = q_t.shape
    num_groups = keys.shape[2]
    grouped_q = q_t.reshape(batch_size, num_groups, num_heads // num_groups, dim)  # [B, G, R, D]
    logits = jnp.einsum("bgrd,bsgd->bgrs", grouped_q, keys.astype(q_t.dtype))  # [B, G, R, S]
    logits = scale * logits + jnp.moveaxis(bias, 1, 2).reshape(logits.shape)
    logits = jnp.where(visible[:, None, None, :], logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrs,bsgd->bgrd", weights, values.astype(weights.dtype))
    return out.reshape(batch_size, num_heads, dim)


def path_prefill_keys(k: jax.Array, w: jax.Array, beta: jax.Array, *, block_size: int = 64) -> jax.Array:
    """Keys carried through every later Householder, ``k̃_j = H_{T−1} … H_{j+1} k_j``: the decode cache
    after a prompt. ``k, w [B, T, G, D]``, ``beta [B, T, G]`` -> ``[B, T, G, D]`` float32 (float64 under
    x64 inputs), computed in O(T·D²) with per-block compact products and suffix products over blocks.
    Give padding tokens ``beta = 0`` (their Householder is then the identity)."""
    if k.ndim != 4 or w.shape != k.shape or beta.shape != k.shape[:3]:
        raise ValueError(f"path_prefill_keys needs k, w [B, T, G, D] and beta [B, T, G], got {k.shape}, "
                         f"{w.shape}, {beta.shape}")
    return keys_to_sequence_end(k, w, beta, block_size)


def path_decode_step(cache_k: jax.Array, cache_v: jax.Array, length: jax.Array, q_t: jax.Array, k_t: jax.Array,
                     v_t: jax.Array, w_t: jax.Array, beta_t: jax.Array, log_f_t: jax.Array | None = None,
                     cum_log_f: jax.Array | None = None, *, scale: float | None = None):
    """One PaTH decode step (paper section 3.3): ``k_j ← (I − β_t w_t w_tᵀ) k_j`` for every cached slot
    ``j < length``, append the raw ``k_t``, ``v_t`` at slot ``length``, then
    ``o_t = Σ_{j≤t} softmax_j(scale·q_t·k_j + G_t − G_j) v_j`` with ``G_t = G_{t−1} + log_f_t``.

    Args:
      cache_k, cache_v: ``[B, S, G, D]`` keys already carried through all earlier Householders, values.
      length: ``[B]`` int32 filled slots per row (rows may differ); a full row drops the new token.
      q_t: ``[B, H, D]``; k_t, v_t, w_t: ``[B, G, D]``; beta_t: ``[B, G]``.
      log_f_t: ``[B, H]`` log forget gate (None: no gate); cum_log_f: ``[B, S, H]`` float32 ``G_j`` per
        slot (required with a gate).
      scale: logit scale, default ``D ** -0.5``.

    Returns ``(o_t [B, H, D] in q_t's dtype, (cache_k, cache_v, length + 1, cum_log_f))``.
    """
    if (log_f_t is None) != (cum_log_f is None):
        raise ValueError("path_decode_step needs log_f_t and cum_log_f together (both None: no forget gate)")
    batch_size, num_slots = cache_k.shape[:2]
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    dtype = accumulation_dtype(q_t, w_t, beta_t)
    rows = jnp.arange(batch_size)
    slots = jnp.arange(num_slots)
    earlier = slots[None, :] < length[:, None]  # [B, S]
    moved = apply_householder(cache_k.astype(dtype), w_t.astype(dtype), beta_t.astype(dtype))
    cache_k = jnp.where(earlier[..., None, None], moved, cache_k).astype(cache_k.dtype)
    cache_k = cache_k.at[rows, length].set(k_t.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[rows, length].set(v_t.astype(cache_v.dtype), mode="drop")
    if cum_log_f is None:
        bias = jnp.zeros((batch_size, num_slots, q_t.shape[1]), dtype)
    else:
        previous = jnp.where((length > 0)[:, None], cum_log_f[rows, jnp.maximum(length - 1, 0)], 0.0)  # [B, H]
        current = previous + log_f_t.astype(cum_log_f.dtype)  # G_t  [B, H]
        cum_log_f = cum_log_f.at[rows, length].set(current, mode="drop")
        bias = (current[:, None, :] - cum_log_f).astype(dtype)  # [B, S, H]
    visible = slots[None, :] <= length[:, None]  # [B, S]
    out = attend(q_t.astype(dtype), cache_k, cache_v, visible, bias, scale)
    return out.astype(q_t.dtype), (cache_k, cache_v, length + 1, cum_log_f)
