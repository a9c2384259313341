"""Log-linear Gated DeltaNet forward kernels after the UT transform (Guo et al. 2025, section 3.3; WY/UT form of
Yang, Kautz, Hatamizadeh 2025, section 3.2), time-major ``[B, T, X, D]`` layout, T padded to whole chunks.

Per chunk ``n`` of C tokens (``g`` the within-chunk cumulative log gates, ``γ = exp(g)``, ``Γ_ts = exp(g_t − g_s)``
for ``s ≤ t``, ``𝒯`` the UT inverse) ``pallas_kernels.gdn.kernel_ut`` gives ``W = 𝒯 diag(βγ) K``,
``U₀ = 𝒯 diag(β) V`` and ``K̃ = K ⊙ exp(g_C − g)``. A state ``S`` entering the chunk leaves it as
``M_n S = γ_C S − K̃ᵀ (W S)`` (the chunk transition ``A_last … A_first``, a K x K matrix applied through
``W S``), and the chunk's own keys leave it as ``X_n = K̃ᵀ U₀``.

Chunk ``n`` reads chunk level ``j`` iff bit ``j`` of ``n`` is 1; that level holds the chunks
``[n_j − 2^j, n_j)`` (``n_j = (n >> j) << j``) carried to the start of chunk n:
``S^{(j)}_n = M_{n−1} … M_{n_j} H_{n_j}`` with ``H_b`` the writes of those chunks carried to boundary ``b``.
Unlike log-linear SSD the carry is a matrix product that differs per chunk, so one state per boundary does not
suffice: every level state is carried through every chunk's transition.

1. ``level_states``: one program per (batch, head, value block) walks the chunks in order with the level stack
   ``S^{(j)}`` (``K x value_block`` float32 each) on chip. Invariant: entering chunk n, level j is non-zero only
   if bit j of n is 1 (so only those levels are carried: the others are zero). At the boundary ``b = n + 1``
   with ``m = lssb(b)`` (a binary-counter increment)::

       H_b = X_n + Σ_{j<m} M_n S^{(j)},  S^{(j)} ← 0 (j < m),  S^{(m)} ← H_b,  S^{(j)} ← M_n S^{(j)} (j > m).

   This keeps the invariant: ``b`` has bits ``< m`` clear, bit ``m`` set and bits ``> m`` equal to n's; the
   chunks ``[b − 2^m, b)`` are chunk n plus the chunks held by levels ``< m`` of n (bits ``< m`` of n all 1).
   It stores the stack entering every chunk, ``[B, H, N, Lc, K, V]`` (chunk 0: zeros).
2. ``chunk_outputs``: one program per (batch, head, chunk, value block), all in parallel::

       O = (((Q Kᵀ) ⊙ Γ) 𝒯 diag(β) ⊙ Λ) V + Σ_{j: bit j of n} λ^{(log2 C + 1 + j)} ⊙ (Q̂ S^{(j)}_n),
       Q̂ = diag(γ) Q − ((Q Kᵀ) ⊙ Γ) W,

   with ``Λ_ts = λ_t^{level(t, s)}`` for the in-chunk levels ``0 … log2 C``: λ weights the final (t, s) entries
   (the pair weights ``q_tᵀ A_t … A_{s+1} β_s k_s``), never the UT inverse, and every key of level j is read
   with the same weight, so the cross-chunk part is a row scaling of ``Q̂ S^{(j)}``.

Products accumulate in float32; the stored level states are in q's dtype (matmul operands only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gdn.kernel_fwd import transition_specs
from pallas_kernels.loglinear.kernel_fwd import (chunk_rank, in_chunk_level_masks, in_chunk_level_weights,
                                                 merge_masks, optional_ref, reads_level)
from pallas_kernels.ssd.common import (causal_decay, dot, dot_transposed_lhs, dot_transposed_rhs, last_row,
                                       launch_options, runs_operand)


def stacked_levels(num_chunks: int) -> int:
    """Chunk levels of ``N`` chunks: ``bit_length(N − 1)`` (at least one slot, unused when N = 1)."""
    return max((num_chunks - 1).bit_length(), 1)


def _chunk_transition(state: jax.Array, w: jax.Array, decayed_keys: jax.Array, decay: jax.Array) -> jax.Array:
    """``M_n S = γ_C S − K̃ᵀ (W S)``: ``state [K, BV]`` float32, ``w, decayed_keys [C, K]``, ``decay [1, 1]``."""
    carried_writes = dot(w, state.astype(w.dtype)).astype(decayed_keys.dtype)  # W S  [C, BV]
    return decay * state - dot_transposed_lhs(decayed_keys, carried_writes)


def _level_states_kernel(w_ref, u0_ref, decayed_ref, cum_ref, *refs, chunk: int, num_chunks: int,
                         num_levels: int):
    """Sequential over chunks with the level stack on chip; stores the stack entering every chunk (module
    docstring, part 1). With per-token ranks (``loglinear.segments``) the counter is the rank and the stack
    restarts at every rank-0 chunk (what is stored for a rank-0 chunk is never read)."""
    ranks_ref, (states_ref,) = optional_ref(refs, 1)
    zeros = jnp.zeros((w_ref.shape[1], u0_ref.shape[1]), jnp.float32)  # [K, BV]
    for level in range(num_levels):
        states_ref[0, level] = zeros.astype(states_ref.dtype)

    def step(n, levels):  # levels: tuple of [K, BV] float32, the stack entering chunk n
        rank = chunk_rank(ranks_ref, n, n * chunk)
        if ranks_ref is not None:  # a segment's first chunk starts from an empty stack
            levels = tuple(jnp.where(rank == 0, 0.0, level) for level in levels)
        rows = pl.ds(n * chunk, chunk)
        w = w_ref[rows, :]  # [C, K]
        decayed_keys = decayed_ref[rows, :]  # K̃  [C, K]
        u0 = u0_ref[rows, :].astype(decayed_keys.dtype)  # U₀  [C, BV]
        decay = jnp.exp(last_row(cum_ref, n * chunk, chunk))[:, None]  # γ_C  [1, 1]
        carried = [jax.lax.cond(reads_level(rank, level),
                                lambda state: _chunk_transition(state, w, decayed_keys, decay),
                                lambda state: state, state)  # a level whose bit is 0 is zero
                   for level, state in enumerate(levels)]
        masks = [merge_masks(rank + 1, level) for level in range(num_levels)]
        merged = dot_transposed_lhs(decayed_keys, u0)  # X_n  [K, BV]
        for (below, _), state in zip(masks, carried):
            merged = merged + jnp.where(below, state, 0.0)
        levels = tuple(jnp.where(below, 0.0, jnp.where(at, merged, state))
                       for (below, at), state in zip(masks, carried))
        for level, state in enumerate(levels):
            states_ref[n + 1, level] = state.astype(states_ref.dtype)
        return levels

    jax.lax.fori_loop(0, num_chunks - 1, step, tuple(zeros for _ in range(num_levels)))


def level_states(w: jax.Array, u0: jax.Array, decayed_keys: jax.Array, cum: jax.Array, *, chunk: int,
                 value_block: int, state_dtype, num_warps: int | None = None, ranks: jax.Array | None = None,
                 rank_chunks: int | None = None, interpret=None) -> jax.Array:
    """The level stack entering every chunk ``[B, H, N, Lc, K, V]`` in ``state_dtype``
    (``Lc = stacked_levels(rank_chunks)``). ``w, decayed_keys [B, T', H, K]``, ``u0 [B, T', H, V]``,
    ``cum [B, T', H]`` float32, ``T' = N·C``; ``ranks [B, T']`` int32 the segment row layout's per-token ranks
    (None: the chunk index), ``rank_chunks`` the most chunks one segment spans (None: N)."""
    batch, length, heads, key_dim = w.shape
    value_dim = u0.shape[3]
    num_chunks = length // chunk
    num_levels = stacked_levels(rank_chunks or num_chunks)
    kernel = functools.partial(_level_states_kernel, chunk=chunk, num_chunks=num_chunks, num_levels=num_levels)
    ranks_specs, ranks_operands = runs_operand(ranks, length, lambda b, h, j: (b, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, value_dim // value_block),
        in_specs=[*transition_specs(length, key_dim, value_block), *ranks_specs],
        out_specs=pl.BlockSpec((None, None, num_chunks, num_levels, key_dim, value_block),
                               lambda b, h, j: (b, h, 0, 0, 0, j)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, num_chunks, num_levels, key_dim, value_dim), state_dtype),
        name="loglinear_gdn_level_states",
        **launch_options(interpret, num_warps),
    )(w, u0, decayed_keys, cum, *ranks_operands)


def _chunk_outputs_kernel(q_ref, k_ref, v_ref, w_ref, inverse_ref, beta_ref, cum_ref, lam_ref, states_ref, *refs,
                          in_chunk_levels: int, cross_levels: int, has_ranks: bool):
    """One chunk: the λ-weighted pair weights times V, plus the reads of the level states (module docstring,
    part 2; with ranks, bit j of the rank); ``Q̂`` itself into ``read_queries_ref`` when given."""
    ranks_ref, (out_ref, *read_queries_ref) = (refs[0], refs[1:]) if has_ranks else (None, refs)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [C, K], [C, K], [C, BV]
    cum = cum_ref[...]  # [C] float32
    chunk = q.shape[0]
    scores = causal_decay(cum) * dot_transposed_rhs(q, k)  # (Q Kᵀ) ⊙ Γ  [C, C] float32
    pair = dot(scores, inverse_ref[...]) * beta_ref[...][None, :]  # ((Q Kᵀ) ⊙ Γ) 𝒯 diag(β)  [C, C]
    lam_weights = in_chunk_level_weights(in_chunk_level_masks(chunk, in_chunk_levels),
                                         [lam_ref[level] for level in range(in_chunk_levels)])  # Λ  [C, C]
    out = dot((pair * lam_weights).astype(v.dtype), v)  # [C, BV] float32
    if cross_levels or read_queries_ref:
        w = w_ref[...]  # [C, K]
        query_from_state = jnp.exp(cum)[:, None] * q.astype(jnp.float32) - dot(scores.astype(w.dtype), w)  # Q̂
        query_from_state = query_from_state.astype(q.dtype)  # [C, K]
        if read_queries_ref:
            read_queries_ref[0][...] = query_from_state
        rank = chunk_rank(ranks_ref, pl.program_id(2))
        for level in range(cross_levels):
            def read_level(out, level=level):
                state = states_ref[level].astype(q.dtype)  # S^{(j)}_n  [K, BV]
                return out + lam_ref[in_chunk_levels + level][:, None] * dot(query_from_state, state)

            out = jax.lax.cond(reads_level(rank, level), read_level, lambda out: out, out)
    out_ref[...] = out.astype(out_ref.dtype)


def chunk_outputs(q: jax.Array, k: jax.Array, v: jax.Array, w: jax.Array, inverse: jax.Array, beta: jax.Array,
                  cum: jax.Array, lam_rows: jax.Array, states: jax.Array, *, chunk: int, in_chunk_levels: int,
                  cross_levels: int, value_block: int, store_read_queries: bool = False,
                  num_warps: int | None = None, ranks: jax.Array | None = None,
                  interpret=None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Outputs ``[B, T', H, V]`` in v's dtype; with ``store_read_queries`` also ``Q̂ [B, T', H, K]`` in q's dtype
    (every value-block program writes the same block), which the backward reads. ``q, k [B, T', G, K]`` (head h
    reads group h // R),
    ``v [B, T', H, V]``, ``w [B, T', H, K]``, ``inverse [B, T', H, C]`` float32 (row t of its chunk's 𝒯),
    ``beta, cum [B, T', H]`` float32, ``lam_rows [B, H, R, T']`` (λ level-major, ``R >= in_chunk + cross``),
    ``states [B, H, N, Lc, K, V]`` from ``level_states``, ``ranks`` as there."""
    batch, length, groups, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    group_of = heads // groups
    num_levels = states.shape[3]
    kernel = functools.partial(_chunk_outputs_kernel, in_chunk_levels=in_chunk_levels, cross_levels=cross_levels,
                               has_ranks=ranks is not None)
    ranks_specs, ranks_operands = runs_operand(ranks, chunk, lambda b, h, n, j: (b, n))
    query_spec = [pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n, j: (b, n, h, 0))] * store_read_queries
    query_shape = [jax.ShapeDtypeStruct((batch, length, heads, key_dim), q.dtype)] * store_read_queries
    outputs = pl.pallas_call(
        kernel,
        grid=(batch, heads, length // chunk, value_dim // value_block),
        in_specs=[
            pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n, j: (b, n, h // group_of, 0)),
            pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n, j: (b, n, h // group_of, 0)),
            pl.BlockSpec((None, chunk, None, value_block), lambda b, h, n, j: (b, n, h, j)),
            pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n, j: (b, n, h, 0)),
            pl.BlockSpec((None, chunk, None, chunk), lambda b, h, n, j: (b, n, h, 0)),
            pl.BlockSpec((None, chunk, None), lambda b, h, n, j: (b, n, h)),
            pl.BlockSpec((None, chunk, None), lambda b, h, n, j: (b, n, h)),
            pl.BlockSpec((None, None, lam_rows.shape[2], chunk), lambda b, h, n, j: (b, h, 0, n)),
            pl.BlockSpec((None, None, None, num_levels, key_dim, value_block), lambda b, h, n, j: (b, h, n, 0, 0, j)),
            *ranks_specs,
        ],
        out_specs=[pl.BlockSpec((None, chunk, None, value_block), lambda b, h, n, j: (b, n, h, j)),
                   *query_spec],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), *query_shape],
        name="loglinear_gdn_chunk_outputs",
        **launch_options(interpret, num_warps),
    )(q, k, v, w, inverse, beta, cum, lam_rows, states, *ranks_operands)
    return tuple(outputs) if store_read_queries else outputs[0]
