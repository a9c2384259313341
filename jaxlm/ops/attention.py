"""Softmax attention (Vaswani et al. 2017, section 3.2) with causal-by-position, segment and GQA masking.

``attention(q, k, v, ...)`` computes, for query token t of head h and key slot s of kv head
g = h // (H // G)::

    o[t, h] = sum_s softmax_s(scale * <q[t, h], k[s, g]> + mask(t, s)) v[s, g]

where ``mask(t, s) = 0`` when key s is visible to query t and a large negative number otherwise.
Key s is visible iff ``kv_positions[s] <= q_positions[t]`` (causal by absolute position), and, when
segment ids are given, ``q_segment_ids[t] == kv_segment_ids[s]``, and, when ``kv_valid`` is given,
``kv_valid[s]``. A query that sees no key gets the uniform average of all values (as
``jax.nn.dot_product_attention`` does); such rows are padding and their output is meaningless.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn", "reference")
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def default_positions(positions: jax.Array | None, batch_size: int, length: int) -> jax.Array:
    """``positions`` if given, else ``arange(length)`` in every row (``[B, T]`` int32)."""
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_valid: jax.Array | None = None,
) -> jax.Array:
    """Boolean visibility ``[B, 1, T, S]``: ``kv_pos[s] <= q_pos[t]`` and same segment and ``kv_valid[s]``."""
    visible = kv_positions[:, None, :] <= q_positions[:, :, None]  # [B, T, S]
    if q_segment_ids is not None:
        visible &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if kv_valid is not None:
        visible &= kv_valid[:, None, :].astype(bool)
    return visible[:, None, :, :]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_valid: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Causal grouped-query softmax attention (equation in the module docstring).

    Args:
      q: ``[B, T, H, D]`` queries.
      k, v: ``[B, S, G, D]`` keys and values, ``H % G == 0``.
      q_positions: ``[B, T]`` int absolute positions of the queries; ``None`` means ``arange(T)``.
      kv_positions: ``[B, S]`` int positions of the keys; ``None`` means ``arange(S)``.
      q_segment_ids, kv_segment_ids: ``[B, T]`` / ``[B, S]`` int segment ids (give both or
        neither); tokens only see keys of their own segment.
      kv_valid: ``[B, S]`` bool, False marks key slots no query may see.
      scale: logit scale, default ``D ** -0.5``.
      impl: ``"xla"`` or ``"cudnn"`` (``jax.nn.dot_product_attention`` with that implementation) or
        ``"reference"`` (explicit float32 einsum/softmax, the test oracle).

    When both positions are ``None``, ``T == S`` and no segment ids / ``kv_valid`` are given, the
    plain causal case is passed as ``is_causal=True`` without a mask, so cuDNN runs its flash
    kernel. Otherwise a boolean mask is built; ``"cudnn"`` receives it too (JAX turns it into an
    additive bias, which cuDNN supports but runs slower than the causal kernel; checked on an H100
    for segment masks, T != S and T = 1 decode). ``"cudnn"`` needs bfloat16/float16 inputs and a
    GPU; other dtypes raise ``ValueError`` (there is no silent fallback to ``"xla"``).

    Returns:
      ``[B, T, H, D]`` in q's dtype.
    """
    _check_attention_inputs(q, k, v, q_segment_ids, kv_segment_ids, impl)
    batch_size, q_length, _, head_dim = q.shape
    kv_length = k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    plain_causal = (
        q_positions is None and kv_positions is None and q_length == kv_length
        and q_segment_ids is None and kv_valid is None
    )
    if plain_causal and impl != "reference":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=impl)
    mask = attention_mask(
        default_positions(q_positions, batch_size, q_length),
        default_positions(kv_positions, batch_size, kv_length),
        q_segment_ids, kv_segment_ids, kv_valid,
    )  # [B, 1, T, S]
    if impl == "reference":
        return reference_attention(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """``softmax(scale * q k^T + mask) v`` written out in float32 with grouped heads (the oracle).

    ``mask`` is boolean ``[B, 1, T, S]``; masked logits get a large finite negative value.
    """
    batch_size, q_length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q_grouped = q.astype(jnp.float32).reshape(
        batch_size, q_length, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, T, G, R, D]
    logits = jnp.einsum("btgrd,bsgd->bgrts", q_grouped, k.astype(jnp.float32)) * scale  # [B, G, R, T, S]
    large_negative = 0.7 * jnp.finfo(jnp.float32).min
    logits = jnp.where(mask[:, :, None], logits, large_negative)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, G, R, T, S]
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v.astype(jnp.float32))  # [B, T, G, R, D]
    return out.reshape(q.shape).astype(q.dtype)


def _check_attention_inputs(q, k, v, q_segment_ids, kv_segment_ids, impl) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r} is not supported; allowed: {ATTENTION_IMPLS}")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention expects q [B, T, H, D] and k, v [B, S, G, D]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"number of query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if impl == "cudnn" and jnp.dtype(q.dtype) not in CUDNN_DTYPES:
        raise ValueError(f"attention impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; "
                         "use impl='xla' for float32")
