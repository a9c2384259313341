"""Blockwise PaTH attention (Yang et al. 2025, section 3.2): the FlashAttention-style algorithm in jnp.

Per block of C tokens with Householders ``H_c = I − β_c w_c w_cᵀ`` (c = 0 … C−1 inside the block), the
product of any contiguous run of them has the compact (UT) form

    H_b … H_a = I − Σ_{a ≤ s ≤ r ≤ b} w_r 𝒯_rs w_sᵀ,   𝒯 = (I + strictlower(D W Wᵀ))⁻¹ D,  D = diag(β),

because every contiguous principal block of the inverse of a triangular matrix is the inverse of that
block. With ``A_q[i, r] = q_i·w_r (r ≤ i)`` and ``A_k[s, j] = w_s·k_j (s > j)`` this gives, as matmuls:

- intra-block logits ``S = Q Kᵀ − A_q 𝒯 A_k`` (``s_ij = q_iᵀ H_i … H_{j+1} k_j``),
- queries carried to the block start ``Q̄ = Q − A_q 𝒯 W`` (``q̄_i = H_0 … H_i q_i``),
- keys carried to the block end ``K̄ = K − A_kᵀ 𝒯ᵀ W`` (``k̄_j = H_{C−1} … H_{j+1} k_j``),
- the whole block ``P = H_{C−1} … H_0 = I − Wᵀ 𝒯 W`` (D×D); a query row moves past it as ``Q ← Q P``.

A query block then visits the key blocks right to left with an online softmax, moving its queries past
each key block's product after using it. All query blocks run in parallel: step ``d`` pairs query block
``n`` with key block ``n − d``. Householders, 𝒯 and logits are float32 (float64 under x64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MASKED_LOGIT = -1e30


def accumulation_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """float32, or float64 when an input is float64 (the float64 test oracles)."""
    dtype = jnp.dtype(jnp.float32)
    for array in arrays:
        if array is not None:
            dtype = jnp.promote_types(dtype, array.dtype)
    return dtype


def to_blocks(x: jax.Array, block_size: int, fill=0) -> jax.Array:
    """``[B, T, ...]`` -> ``[B, N, C, ...]`` with ``N = ceil(T / C)``, the tail padded with ``fill``."""
    length = x.shape[1]
    num_blocks = -(-length // block_size)
    padding = [(0, 0)] * x.ndim
    padding[1] = (0, num_blocks * block_size - length)
    x = jnp.pad(x, padding, constant_values=fill)
    return x.reshape(x.shape[0], num_blocks, block_size, *x.shape[2:])


def ut_transform(w: jax.Array, beta: jax.Array) -> jax.Array:
    """``𝒯 = (I + strictlower(D W Wᵀ))⁻¹ D`` per block: ``w [B, N, C, G, D]``, ``beta [B, N, C, G]`` ->
    ``[B, N, G, C, C]`` (lower triangular; float32 triangular solve)."""
    block_size = w.shape[2]
    # Full float32 products for the triangular system (GPUs would otherwise use TF32 here).
    gram = jnp.einsum("bncgd,bnsgd->bngcs", w, w, precision=jax.lax.Precision.HIGHEST)  # [B, N, G, C, C]
    beta_rows = jnp.moveaxis(beta, 2, 3)  # [B, N, G, C]
    strict_lower = jnp.tril(jnp.ones((block_size, block_size), bool), -1)
    eye = jnp.eye(block_size, dtype=w.dtype)
    system = eye + jnp.where(strict_lower, beta_rows[..., :, None] * gram, 0.0)  # [B, N, G, C, C]
    diagonal = beta_rows[..., :, None] * eye  # diag(β)  [B, N, G, C, C]
    return jax.scipy.linalg.solve_triangular(system, diagonal, lower=True, unit_diagonal=True)


def key_mixing(w: jax.Array, k: jax.Array) -> jax.Array:
    """``A_k[s, j] = w_s · k_j`` for ``s > j`` (0 elsewhere): ``[B, N, C, G, D]`` x2 -> ``[B, N, G, C, C]``."""
    block_size = w.shape[2]
    strict_lower = jnp.tril(jnp.ones((block_size, block_size), bool), -1)
    return jnp.where(strict_lower, jnp.einsum("bnsgd,bnjgd->bngsj", w, k), 0.0)


def keys_to_block_end(k: jax.Array, w: jax.Array, transform: jax.Array) -> jax.Array:
    """``k̄_j = H_{C−1} … H_{j+1} k_j``, i.e. ``K̄ = K − A_kᵀ 𝒯ᵀ W``: ``[B, N, C, G, D]`` -> same."""
    mixing = key_mixing(w, k)  # [B, N, G, C, C]
    return k - jnp.einsum("bngsj,bngts,bntgd->bnjgd", mixing, transform, w)


def move_queries_past_block(q: jax.Array, products: jax.Array) -> jax.Array:
    """``q ← Pᵀ q`` for the key block's product ``P = I − Wᵀ 𝒯 W``, as rows ``Q ← Q P``: O(C·D²) per
    block, cheaper than ``Q − (Q Wᵀ) 𝒯 W`` whenever C ≥ D.

    ``q [B, N, C, G, R, D]``, ``products [B, N, G, D, D]`` -> ``[B, N, C, G, R, D]``.
    """
    return jnp.einsum("bncgrd,bngde->bncgre", q, products)


def block_products(w: jax.Array, transform: jax.Array) -> jax.Array:
    """Each block's product ``P = H_{C−1} … H_0 = I − Wᵀ 𝒯 W`` as a matrix ``[B, N, G, D, D]``."""
    dim = w.shape[-1]
    return jnp.eye(dim, dtype=w.dtype) - jnp.einsum("bnsgd,bngst,bntge->bngde", w, transform, w)


def intra_block_terms(q: jax.Array, k: jax.Array, w: jax.Array, transform: jax.Array):
    """(intra-block logits ``S = Q Kᵀ − A_q 𝒯 A_k`` ``[B, N, G, R, C, C]`` (unscaled, unmasked),
    queries carried to the block start ``Q̄ = Q − A_q 𝒯 W`` ``[B, N, C, G, R, D]``)."""
    block_size = w.shape[2]
    lower = jnp.tril(jnp.ones((block_size, block_size), bool))
    query_mixing = jnp.where(lower, jnp.einsum("bncgrd,bnsgd->bngrcs", q, w), 0.0)  # A_q  [B, N, G, R, C, C]
    key_mix = key_mixing(w, k)  # A_k  [B, N, G, C, C]
    mixed = jnp.einsum("bngrcs,bngst->bngrct", query_mixing, transform)  # A_q 𝒯  [B, N, G, R, C, C]
    logits = jnp.einsum("bncgrd,bnjgd->bngrcj", q, k) - jnp.einsum("bngrct,bngtj->bngrcj", mixed, key_mix)
    queries_at_start = q - jnp.einsum("bngrct,bntgd->bncgrd", mixed, w)
    return logits, queries_at_start


class BlockwiseTerms(NamedTuple):
    """The per-block precomputations shared by every query block (``R`` query heads per KV group)."""

    queries_at_start: jax.Array  # Q̄  [B, N, C, G, R, D]
    intra_logits: jax.Array  # S = Q Kᵀ − A_q 𝒯 A_k  [B, N, G, R, C, C]
    keys_at_end: jax.Array  # K̄  [B, N, C, G, D]
    values: jax.Array  # [B, N, C, G, D]
    products: jax.Array  # P = I − Wᵀ 𝒯 W  [B, N, G, D, D]
    cumulative_gate: jax.Array  # G_t  [B, N, G, R, C]


def blockwise_terms(q, k, v, w, beta, log_f, block_size: int) -> BlockwiseTerms:
    """Split ``[B, T, ...]`` inputs into blocks of C tokens (tail padded, ``β = 0`` there so H = I) and
    compute 𝒯, then K̄, Q̄, the intra-block logits and the block products, in the accumulation dtype."""
    batch_size, length, num_heads, dim = q.shape
    num_groups = k.shape[2]
    dtype = accumulation_dtype(q, k, v, w, beta, log_f)
    grouped = (batch_size, length, num_groups, num_heads // num_groups, dim)
    qb = to_blocks(q.astype(dtype).reshape(grouped), block_size)  # [B, N, C, G, R, D]
    kb = to_blocks(k.astype(dtype), block_size)  # [B, N, C, G, D]
    vb = to_blocks(v.astype(dtype), block_size)  # [B, N, C, G, D]
    wb = to_blocks(w.astype(dtype), block_size)  # [B, N, C, G, D]
    betab = to_blocks(beta.astype(dtype), block_size)  # [B, N, C, G]
    if log_f is None:
        gate = jnp.zeros(grouped[:-1], dtype)
    else:
        gate = jnp.cumsum(log_f.astype(dtype), axis=1).reshape(grouped[:-1])  # G_t  [B, T, G, R]
    cumulative_gate = jnp.moveaxis(to_blocks(gate, block_size), 2, 4)  # [B, N, G, R, C]
    transform = ut_transform(wb, betab)  # 𝒯  [B, N, G, C, C]
    keys_at_end = keys_to_block_end(kb, wb, transform)  # K̄  [B, N, C, G, D]
    intra_logits, queries_at_start = intra_block_terms(qb, kb, wb, transform)
    products = block_products(wb, transform)  # P  [B, N, G, D, D]
    return BlockwiseTerms(queries_at_start, intra_logits, keys_at_end, vb, products, cumulative_gate)


def segment_blocks(segment_ids: jax.Array | None, batch_size: int, length: int, block_size: int) -> jax.Array:
    """``[B, T]`` segment ids (None: one segment) -> ``[B, N, C]`` int32, ``-1`` on the tail padding."""
    if segment_ids is None:
        segment_ids = jnp.zeros((batch_size, length), jnp.int32)
    return to_blocks(segment_ids.astype(jnp.int32), block_size, fill=-1)


def masked_block_logits(raw, query_segments, key_segments, query_gate, key_gate, visible, scale: float):
    """``scale·s_ij + G_i − G_j`` where ``visible`` and i, j share a segment, MASKED_LOGIT elsewhere.

    ``raw [B, N, G, R, C, C']``, segments ``[B, N, C]`` / ``[B, N, C']``, gates ``[B, N, G, R, C]`` /
    ``[B, N, G, R, C']``, ``visible`` broadcastable to ``raw``.
    """
    same_segment = query_segments[:, :, :, None] == key_segments[:, :, None, :]  # [B, N, C, C']
    visible = visible & same_segment[:, :, None, None]
    biased = scale * raw + query_gate[..., :, None] - key_gate[..., None, :]
    return jnp.where(visible, biased, MASKED_LOGIT)


def blockwise_forward(terms: BlockwiseTerms, segments: jax.Array, scale: float):
    """Every query block visits its key blocks right to left with an online softmax, all query blocks in
    parallel (step ``d`` pairs query block n with key block n − d). Returns the outputs
    ``[B, N, G, R, C, D]`` and the per-query ``logsumexp_j(logits_ij)`` ``[B, N, G, R, C]``, both in the
    accumulation dtype. Memory O(T·C) per step of the scan over block offsets."""
    queries, intra_logits, keys_at_end, vb, products, cumulative_gate = terms
    num_blocks, block_size = segments.shape[1:]
    causal = jnp.tril(jnp.ones((block_size, block_size), bool))
    logits = masked_block_logits(intra_logits, segments, segments, cumulative_gate, cumulative_gate, causal,
                                 scale)  # [B, N, G, R, C, C]
    running_max = logits.max(axis=-1)  # [B, N, G, R, C]; finite: every token sees itself
    probabilities = jnp.exp(logits - running_max[..., None])
    running_sum = probabilities.sum(axis=-1)  # [B, N, G, R, C]
    accumulator = jnp.einsum("bngrcj,bnjgd->bngrcd", probabilities, vb)  # [B, N, G, R, C, D]
    block_index = jnp.arange(num_blocks)

    @jax.checkpoint
    def visit_key_block(carry, offset):
        """Query block n meets key block n − offset, then moves its queries past that block's product."""
        queries, running_max, running_sum, accumulator = carry
        source = jnp.maximum(block_index - offset, 0)  # [N]
        exists = (block_index >= offset)[None, :, None, None, None, None]  # [1, N, 1, 1, 1, 1]
        raw = jnp.einsum("bncgrd,bnjgd->bngrcj", queries, keys_at_end[:, source])  # [B, N, G, R, C, C]
        logits = masked_block_logits(raw, segments, segments[:, source], cumulative_gate,
                                     cumulative_gate[:, source], exists, scale)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))  # [B, N, G, R, C]
        rescale = jnp.exp(running_max - new_max)
        probabilities = jnp.exp(logits - new_max[..., None])
        running_sum = running_sum * rescale + probabilities.sum(axis=-1)
        accumulator = accumulator * rescale[..., None] + jnp.einsum("bngrcj,bnjgd->bngrcd", probabilities,
                                                                    vb[:, source])
        queries = move_queries_past_block(queries, products[:, source])
        return (queries, new_max, running_sum, accumulator), None

    carry = (queries, running_max, running_sum, accumulator)
    if num_blocks > 1:
        carry, _ = jax.lax.scan(visit_key_block, carry, jnp.arange(1, num_blocks))
    _, running_max, running_sum, accumulator = carry
    return accumulator / running_sum[..., None], running_max + jnp.log(running_sum)


def blocks_to_sequence(out: jax.Array, length: int) -> jax.Array:
    """``[B, N, G, R, C, D]`` -> ``[B, T, H, D]`` (tail padding dropped)."""
    batch_size, num_blocks, num_groups, heads_per_group, block_size, dim = out.shape
    out = jnp.moveaxis(out, 4, 2).reshape(batch_size, num_blocks * block_size, num_groups * heads_per_group, dim)
    return out[:, :length]


def blockwise_path_attention(q, k, v, w, beta, log_f, scale, block_size, segment_ids):
    """PaTH attention by blocks (module docstring); arguments as in ``jaxlm.ops.path.path_attention``,
    already validated. Differentiated by plain autodiff through the checkpointed scan, which keeps every
    step's moved queries: O(T²/C · D) gradient memory (``jaxlm.ops.path_blockwise_vjp`` is linear in T)."""
    batch_size, length = q.shape[:2]
    terms = blockwise_terms(q, k, v, w, beta, log_f, block_size)
    segments = segment_blocks(segment_ids, batch_size, length, block_size)  # [B, N, C]
    out, _ = blockwise_forward(terms, segments, scale)
    return blocks_to_sequence(out, length).astype(q.dtype)


def keys_to_sequence_end(k: jax.Array, w: jax.Array, beta: jax.Array, block_size: int) -> jax.Array:
    """``k̃_j = H_{T−1} … H_{j+1} k_j`` for ``k, w [B, T, G, D]``, ``beta [B, T, G]``, in O(T·D²):
    keys carried to their block end, then through the suffix product of the later blocks."""
    length = k.shape[1]
    dtype = accumulation_dtype(k, w, beta)
    kb = to_blocks(k.astype(dtype), block_size)  # [B, N, C, G, D]
    wb = to_blocks(w.astype(dtype), block_size)  # [B, N, C, G, D]
    betab = to_blocks(beta.astype(dtype), block_size)  # [B, N, C, G]
    transform = ut_transform(wb, betab)  # [B, N, G, C, C]
    keys_at_end = keys_to_block_end(kb, wb, transform)  # [B, N, C, G, D]
    products = block_products(wb, transform)  # P_n  [B, N, G, D, D]

    def prepend_block(suffix, product):
        """``S_n = S_{n+1} P_{n+1}``: the product of every block after n, scanned from the last block."""
        return suffix @ product, suffix

    identity = jnp.broadcast_to(jnp.eye(k.shape[-1], dtype=dtype), products[:, 0].shape)  # [B, G, D, D]
    later_products = jnp.moveaxis(products, 1, 0)  # [N, B, G, D, D]
    _, suffixes = jax.lax.scan(prepend_block, identity, later_products, reverse=True)  # S_n  [N, B, G, D, D]
    carried = jnp.einsum("nbgde,bncge->bncgd", suffixes, keys_at_end)  # [B, N, C, G, D]
    return carried.reshape(k.shape[0], -1, *k.shape[2:])[:, :length]
