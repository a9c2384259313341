"""Log-linear SSD forward kernels (Guo et al. 2025, section 3.2, chunkwise form with fused levels),
time-major ``[B, T, X, D]`` layout, T padded to whole chunks of C tokens.

Chunk ``n`` reads chunk level ``j`` iff bit ``j`` of ``n`` is 1; that level then holds the chunks
``[n_j − 2^j, n_j)`` with ``n_j = (n >> j) << j``, decayed to the start of chunk ``n``. Every such state is
one state ``H_{n_j}`` (built once, at the chunk boundary ``n_j``, whose lowest set bit is ``j``) carried on
by the scalar decay ``exp(Σ_{m=n_j}^{n−1} log_decay_m)``. So one state per chunk boundary is all the
outputs need, the same count as plain SSD:

1. ``level_states``: one program per (batch, head, key block, value block) walks the chunks in order,
   keeping the Fenwick level stack on chip, and merges it like a binary counter at every boundary
   ``b = n + 1`` with ``m = lssb(b)``::

       H_b = X_n + a_n Σ_{j<m} S^{(j)},   S^{(j)} ← 0 (j < m),   S^{(m)} ← H_b,   S^{(j)} ← a_n S^{(j)} (j > m)

   with ``X_n = (K ⊙ exp(c_last − c))ᵀ V`` chunk n's own keys at its end and ``a_n = exp(c_last)``
   (``c`` the within-chunk cumulative log gates). It stores ``H_b`` in slot ``b`` (slot 0: zeros). Only the
   levels that are merged again later are carried: ``ceil(log2 N) − 1`` of them.
2. ``chunk_outputs``: one program per (batch, head, chunk, value block), all in parallel::

       O = ((Q Kᵀ) ⊙ L ⊙ Λ) V + Σ_{j: bit j of n} r^{(j)} ⊙ (Q H_{n_j})

   with ``L_ts = exp(c_t − c_s)`` (s ≤ t), ``Λ_ts = λ_t^{level(t, s)}`` for the in-chunk levels
   ``0 … log2 C`` and the read weights ``r^{(j)}_t = λ_t^{(log2 C + 1 + j)} exp(c_t) exp(Σ_{m=n_j}^{n−1}
   log_decay_m)`` (prepared in ``api``). Levels whose bit is 0 are skipped.

Products accumulate in float32; the stored states are in ``k``'s dtype (matmul operands only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ssd.common import (causal_decay, dot, dot_transposed_lhs, dot_transposed_rhs, last_row,
                                       launch_options, runs_operand, sequential_state_pass, token_dims,
                                       token_spec)


def chunk_rank(ranks_ref, chunk_index: jax.Array, token: jax.Array | int = 0) -> jax.Array:
    """The rank of a chunk in its segment (``segments``): ``ranks_ref[token]`` of the per-token ranks, or the chunk
    index itself without ranks (one sequence per row)."""
    return chunk_index if ranks_ref is None else ranks_ref[token]


def optional_ref(refs: tuple, outputs: int) -> tuple:
    """Split a kernel's trailing refs into (the optional ranks ref or None, the ``outputs`` output refs)."""
    return (refs[0] if len(refs) > outputs else None), refs[len(refs) - outputs:]


def carried_levels(num_chunks: int) -> int:
    """Chunk levels the sequential pass keeps on chip: those merged again at a later boundary
    (``bit_length(N − 1) − 1``; the top level is only ever read)."""
    return max((num_chunks - 1).bit_length() - 1, 0)


def merge_masks(boundary: jax.Array, level: int) -> tuple[jax.Array, jax.Array]:
    """(``level < lssb(boundary)``: merged away, ``level == lssb(boundary)``: receives the merge), as scalar
    booleans, from bit masks only."""
    below = jnp.bitwise_and(boundary, (2 << level) - 1) == 0
    at = (jnp.bitwise_and(boundary, (1 << level) - 1) == 0) & jnp.logical_not(below)
    return below, at


def reads_level(chunk_index: jax.Array, level: int) -> jax.Array:
    """Chunk ``n`` reads chunk level ``j`` iff bit ``j`` of ``n`` is 1 (scalar boolean)."""
    return jnp.bitwise_and(jnp.right_shift(chunk_index, level), 1) == 1


def read_slot(chunk_index: jax.Array, level: int) -> jax.Array:
    """The boundary ``n_j = (n >> j) << j`` whose stored state chunk ``n`` reads at level ``j``."""
    return jnp.left_shift(jnp.right_shift(chunk_index, level), level)


def _level_states_kernel(k_ref, v_ref, cum_ref, zeros_ref, *refs, chunk: int, num_chunks: int, num_levels: int):
    """Sequential over chunks with the level stack on chip; stores ``H_b`` at every boundary (module docstring).
    With per-token ranks (``segments``) the counter is the rank and the stack restarts at every rank-0 chunk."""
    ranks_ref, (states_ref, unused_ref) = optional_ref(refs, 2)
    zeros = zeros_ref[...].astype(jnp.float32)  # [BK, BV]
    states_ref[0] = zeros.astype(states_ref.dtype)

    def step(n, levels):  # levels: tuple of [BK, BV] float32, each at the start of chunk n
        rank = chunk_rank(ranks_ref, n, n * chunk)
        if ranks_ref is not None:  # a segment's first chunk starts from an empty stack
            levels = tuple(jnp.where(rank == 0, 0.0, level) for level in levels)
        rows = pl.ds(n * chunk, chunk)
        k = k_ref[rows, :]  # [C, BK]
        v = v_ref[rows, :]  # [C, BV]
        cum = cum_ref[rows]  # [C]
        cum_last = last_row(cum_ref, n * chunk, chunk)  # [1]
        weighted_k = (k.astype(jnp.float32) * jnp.exp(cum_last - cum)[:, None]).astype(k.dtype)  # [C, BK]
        merged = dot_transposed_lhs(weighted_k, v)  # [BK, BV] X_n
        decay = jnp.exp(cum_last)[:, None]  # [1, 1] a_n
        decayed = [decay * level for level in levels]
        boundary = rank + 1
        masks = [merge_masks(boundary, level) for level in range(len(levels))]
        for (below, _), level in zip(masks, decayed):
            merged = merged + jnp.where(below, level, 0.0)
        states_ref[n + 1] = merged.astype(states_ref.dtype)
        return tuple(jnp.where(below, 0.0, jnp.where(at, merged, level)) for (below, at), level in zip(masks, decayed))

    jax.lax.fori_loop(0, num_chunks - 1, step, tuple(zeros for _ in range(num_levels)))
    unused_ref[...] = zeros


def level_states(k: jax.Array, v: jax.Array, cum: jax.Array, *, chunk: int, key_block: int, value_block: int,
                 num_warps: int | None = None, ranks: jax.Array | None = None, rank_chunks: int | None = None,
                 interpret=None) -> jax.Array:
    """``H_b`` of every chunk boundary ``[B, H, N, K, V]`` in ``k``'s dtype (slot 0: zeros).
    ``k [B, T', G, K]``, ``v [B, T', H, V]`` time-major, ``cum [B, H, T']`` float32, ``T' = N·C``. ``ranks [B, T']``
    int32: the segment row layout's per-token ranks (``segments``; None: the chunk index), ``rank_chunks`` the
    most chunks one segment spans (None: N), which sizes the level stack."""
    batch, length, heads, value_dim = token_dims(v, True)
    zeros = jnp.zeros((batch, heads, k.shape[-1], value_dim), jnp.float32)
    num_levels = carried_levels(rank_chunks or length // chunk)
    states, _ = sequential_state_pass(functools.partial(_level_states_kernel, num_levels=num_levels), k, v, cum,
                                      zeros, chunk=chunk, key_block=key_block, value_block=value_block,
                                      num_warps=num_warps, num_stages=None, time_major=True, interpret=interpret,
                                      name="loglinear_level_states", runs=ranks)
    return states


def in_chunk_level_masks(chunk: int, num_levels: int) -> list[jax.Array]:
    """``level(t, s) == ℓ`` for ``ℓ = 0 … num_levels − 1`` with ``level = bit_length(t XOR s)`` of positions in
    the (aligned) chunk: ``[C, C]`` bool each (from bit masks only)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    xor = jnp.bitwise_xor(rows, cols)  # [C, C]
    return [xor == 0 if level == 0 else jnp.right_shift(xor, level - 1) == 1 for level in range(num_levels)]


def in_chunk_level_weights(masks: list[jax.Array], lam_rows: list[jax.Array]) -> jax.Array:
    """``Λ_ts = λ_t^{level(t, s)}``: the masks of ``in_chunk_level_masks`` and one ``[C]`` λ row per level ->
    ``[C, C]`` float32."""
    weights = jnp.zeros(masks[0].shape, jnp.float32)
    for in_level, row in zip(masks, lam_rows):
        weights = jnp.where(in_level, row.astype(jnp.float32)[:, None], weights)
    return weights


def _chunk_outputs_kernel(q_ref, k_ref, v_ref, cum_ref, lam_ref, read_ref, states_ref, *refs, in_chunk_levels: int,
                          cross_levels: int):
    """One chunk: in-chunk levels through the masked ``C x C`` block, chunk levels from the stored states (with
    ranks: bit ``j`` of the rank, from slot ``n − rank + ((rank >> j) << j)``)."""
    ranks_ref, (out_ref,) = optional_ref(refs, 1)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [C, K], [C, K], [C, BV]
    chunk = q.shape[0]
    level_weights = in_chunk_level_weights(in_chunk_level_masks(chunk, in_chunk_levels),
                                           [lam_ref[level] for level in range(in_chunk_levels)])  # [C, C]
    weights = causal_decay(cum_ref[...]) * dot_transposed_rhs(q, k) * level_weights  # [C, C] float32
    out = dot(weights.astype(v.dtype), v)  # [C, BV]
    chunk_index = pl.program_id(2)
    rank = chunk_rank(ranks_ref, chunk_index)
    for level in range(cross_levels):
        def read_level(out, level=level):
            state = states_ref[chunk_index - rank + read_slot(rank, level)].astype(q.dtype)  # [K, BV] H_{n_j}
            return out + read_ref[level][:, None] * dot(q, state)

        out = jax.lax.cond(reads_level(rank, level), read_level, lambda out: out, out)
    out_ref[...] = out.astype(out_ref.dtype)


def chunk_outputs(q: jax.Array, k: jax.Array, v: jax.Array, cum: jax.Array, lam_rows: jax.Array,
                  read_rows: jax.Array, states: jax.Array, *, chunk: int, in_chunk_levels: int, cross_levels: int,
                  value_block: int, num_warps: int | None = None, ranks: jax.Array | None = None,
                  interpret=None) -> jax.Array:
    """Outputs ``[B, T', H, V]`` in ``v``'s dtype. ``q, k [B, T', G, K]``, ``v [B, T', H, V]``, ``cum [B, H, T']``,
    ``lam_rows [B, H, R_in, T']`` (in-chunk λ, level-major), ``read_rows [B, H, R_x, T']`` (read weights),
    ``states [B, H, N, K, V]`` from ``level_states``, ``ranks`` as there."""
    batch, length, groups, key_dim = token_dims(q, True)
    heads, value_dim = token_dims(v, True)[2:]
    group_of = heads // groups
    kernel = functools.partial(_chunk_outputs_kernel, in_chunk_levels=in_chunk_levels, cross_levels=cross_levels)
    ranks_specs, ranks_operands = runs_operand(ranks, chunk, lambda b, h, n, j: (b, n))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, length // chunk, value_dim // value_block),
        in_specs=[
            token_spec(True, None, chunk, key_dim, lambda b, h, n, j: (b, h // group_of, n, 0)),
            token_spec(True, None, chunk, key_dim, lambda b, h, n, j: (b, h // group_of, n, 0)),
            token_spec(True, None, chunk, value_block, lambda b, h, n, j: (b, h, n, j)),
            pl.BlockSpec((None, None, chunk), lambda b, h, n, j: (b, h, n)),
            pl.BlockSpec((None, None, lam_rows.shape[2], chunk), lambda b, h, n, j: (b, h, 0, n)),
            pl.BlockSpec((None, None, read_rows.shape[2], chunk), lambda b, h, n, j: (b, h, 0, n)),
            pl.BlockSpec((None, None, states.shape[2], key_dim, value_block), lambda b, h, n, j: (b, h, 0, 0, j)),
            *ranks_specs,
        ],
        out_specs=token_spec(True, None, chunk, value_block, lambda b, h, n, j: (b, h, n, j)),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        name="loglinear_chunk_outputs",
        **launch_options(interpret, num_warps),
    )(q, k, v, cum, lam_rows, read_rows, states, *ranks_operands)
