"""Log-linear Gated DeltaNet backward kernels for the level states, time-major ``[B, T, X, D]`` layout, T padded to
whole chunks: the reverse pass of the level-state cotangents (the transpose of ``kernel_fwd.level_states``) and the
per-chunk gradients of the level reads.

Notation of ``kernel_fwd``: ``S^{(j)}_n`` the level stack entering chunk n, ``M_n S = γ_C S − K̃ᵀ (W S)`` the
chunk transition, ``X_n = K̃ᵀ U₀`` the chunk's own writes, ``Q̂ = diag(γ) Q − ((Q Kᵀ) ⊙ Γ) W`` the queries that
read a state entering the chunk, ``L0 = log2 C + 1`` in-chunk levels. Chunk n's outputs read
``Σ_{j: bit j of n} λ^{(L0+j)} ⊙ (Q̂_n S^{(j)}_n)``, so with ``dO`` the output cotangent the direct cotangent of
a read level is

    D^{(j)}_n = Q̂_nᵀ diag(λ^{(L0+j)}_n) dO_n    (K x V).

Everything else chunk n passes on leaves through the boundary ``b = n + 1`` (``m = lssb(b)``)::

    H_b = X_n + Σ_{j<m} M_n S^{(j)}_n,   S^{(m)}_b = H_b,   S^{(j)}_b = 0 (j < m),   S^{(j)}_b = M_n S^{(j)}_n (j > m).

Its transpose, with ``dS^{(j)}_b`` the total cotangents of the stack entering chunk b: the merged state's
cotangent is ``dH = dS^{(m)}_b``, so the cotangent of the carried state ``M_n S^{(j)}_n`` is

    E^{(j)}_n = dH (j < m),   0 (j = m: level m of n is empty),   dS^{(j)}_b (j > m),

``dX_n = dH``, and the total cotangent of the stack entering chunk n is

    dS^{(j)}_n = D^{(j)}_n + M_nᵀ E^{(j)}_n   (bit j of n set),   0 otherwise,
    M_nᵀ E = γ_C E − Wᵀ (K̃ E).

(A level whose bit is 0 holds no keys: it was reset to zero, so nothing upstream depends on it, and setting
its cotangent to 0 keeps every unread level's cotangent zero, as the forward keeps its state zero.)
``E^{(j)}_n`` and ``dX_n`` are exactly the cotangents of the per-chunk map
``inputs of chunk n -> (O_n, M_n S^{(·)}_n, X_n)``, whose VJP gives every input gradient (``backward``).

1. ``level_cotangents``: one program per (batch, head, value block) walks the chunks backwards with the stack
   ``dS^{(j)}`` (``K x value_block`` float32 each) on chip, starting from zeros after the last chunk; per chunk
   it stores ``E^{(j)}_n`` ``[Lc, K, BV]`` and ``dX_n`` ``[K, BV]`` in the requested dtype. The stack has the
   same size as the forward pass's (one tile per chunk level).
2. ``level_read_grads``: one program per (batch, head, chunk), all in parallel: the cotangents of the reads
   ``Σ_j λ^{(L0+j)} ⊙ (Q̂ S^{(j)}_n)`` of the stored level states,

       dQ̂ = Σ_{j: bit j of n} diag(λ^{(L0+j)}) dO S^{(j)ᵀ}_n,    dλ^{(L0+j)}_t = dO_t · (Q̂ S^{(j)}_n)_t,

   walking the value dim ``value_block`` columns at a time (both contract it), so each level state is read once.
3. ``transition_cotangents``: one program per (batch, head, chunk), all in parallel: the cotangent of the chunk
   transition ``M_n`` (``M_n S`` is linear in ``M_n``),

       P_n = Σ_{j: bit j of n} E^{(j)}_n S^{(j)ᵀ}_n    (K x K; the unread levels hold ``S^{(j)}_n = 0``),

   ``key_block`` rows of ``P_n`` at a time (one ``key_block x K`` float32 sum live), reading only the read levels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.loglinear.kernel_fwd import chunk_rank, merge_masks, optional_ref, reads_level
from pallas_kernels.loglinear_gdn.kernel_fwd import stacked_levels
from pallas_kernels.ssd.common import (dot, dot_transposed_lhs, dot_transposed_rhs, last_row, launch_options,
                                       runs_operand)


def _transposed_transition(cotangent: jax.Array, w: jax.Array, decayed_keys: jax.Array,
                           decay: jax.Array) -> jax.Array:
    """``M_nᵀ E = γ_C E − Wᵀ (K̃ E)``: ``cotangent [K, BV]`` float32, ``w, decayed_keys [C, K]``, ``decay [1, 1]``."""
    keyed = dot(decayed_keys, cotangent.astype(decayed_keys.dtype)).astype(w.dtype)  # K̃ E  [C, BV]
    return decay * cotangent - dot_transposed_lhs(w, keyed)


def _level_cotangents_kernel(read_queries_ref, d_out_ref, w_ref, decayed_ref, cum_ref, lam_ref, *refs, chunk: int,
                             num_chunks: int, num_levels: int, in_chunk_levels: int, cross_levels: int):
    """Reverse over chunks with the cotangent stack on chip (module docstring). With ranks the counter is the
    rank: a rank-0 chunk reads no level, so it passes zero cotangents to the previous segment's stack."""
    ranks_ref, (carried_ref, writes_ref) = optional_ref(refs, 2)
    zeros = jnp.zeros((w_ref.shape[1], d_out_ref.shape[1]), jnp.float32)  # [K, BV]

    def step(i, levels):  # levels: tuple of [K, BV] float32, the cotangents of the stack entering chunk n + 1
        n = num_chunks - 1 - i
        rank = chunk_rank(ranks_ref, n, n * chunk)
        masks = [merge_masks(rank + 1, level) for level in range(num_levels)]
        merged = zeros  # dH = dS^{(m)}_{n+1}
        for (_, at), total in zip(masks, levels):
            merged = merged + jnp.where(at, total, 0.0)
        carried = [jnp.where(below, merged, jnp.where(at, 0.0, total))
                   for (below, at), total in zip(masks, levels)]  # E^{(j)}_n
        for level, cotangent in enumerate(carried):
            carried_ref[n, level] = cotangent.astype(carried_ref.dtype)
        writes_ref[n] = merged.astype(writes_ref.dtype)

        rows = pl.ds(n * chunk, chunk)
        w = w_ref[rows, :]  # [C, K]
        decayed_keys = decayed_ref[rows, :]  # K̃  [C, K]
        read_queries = read_queries_ref[rows, :].astype(jnp.float32)  # Q̂  [C, K]
        d_out = d_out_ref[rows, :]  # dO  [C, BV]
        decay = jnp.exp(last_row(cum_ref, n * chunk, chunk))[:, None]  # γ_C  [1, 1]

        def entering(cotangent, level):
            weighted = (read_queries * lam_ref[in_chunk_levels + level, rows][:, None]).astype(d_out.dtype)
            direct = dot_transposed_lhs(weighted, d_out)  # D^{(j)}_n  [K, BV]
            return direct + _transposed_transition(cotangent, w, decayed_keys, decay)

        return tuple(jax.lax.cond(reads_level(rank, level), functools.partial(entering, level=level),
                                  lambda cotangent: zeros, cotangent) if level < cross_levels else zeros
                     for level, cotangent in enumerate(carried))  # N = 1: one unused slot, never read

    jax.lax.fori_loop(0, num_chunks, step, tuple(zeros for _ in range(num_levels)))


def level_cotangents(read_queries: jax.Array, d_out: jax.Array, w: jax.Array, decayed_keys: jax.Array,
                     cum: jax.Array, lam_rows: jax.Array, *, chunk: int, in_chunk_levels: int, value_block: int,
                     cotangent_dtype, num_warps: int | None = None, ranks: jax.Array | None = None,
                     rank_chunks: int | None = None, interpret=None) -> tuple[jax.Array, jax.Array]:
    """(``E [B, H, N, Lc, K, V]``: cotangents of every level carried through every chunk's transition,
    ``dX [B, H, N, K, V]``: cotangents of every chunk's writes), both in ``cotangent_dtype``.

    ``read_queries`` (Q̂), ``w``, ``decayed_keys`` (K̃) ``[B, T', H, K]``, ``d_out [B, T', H, V]``,
    ``cum [B, T', H]`` float32, ``lam_rows [B, H, R, T']`` (λ level-major, ``level_inputs.level_rows``: ``R``
    covers the ``in_chunk_levels`` and the ``bit_length(N − 1)`` chunk levels), ``T' = N·C``,
    ``Lc = kernel_fwd.stacked_levels(rank_chunks)``; ``ranks``, ``rank_chunks`` as in ``kernel_fwd.level_states``."""
    batch, length, heads, key_dim = w.shape
    value_dim = d_out.shape[3]
    num_chunks = length // chunk
    rank_chunks = rank_chunks or num_chunks
    num_levels = stacked_levels(rank_chunks)
    kernel = functools.partial(_level_cotangents_kernel, chunk=chunk, num_chunks=num_chunks, num_levels=num_levels,
                               in_chunk_levels=in_chunk_levels, cross_levels=(rank_chunks - 1).bit_length())
    ranks_specs, ranks_operands = runs_operand(ranks, length, lambda b, h, j: (b, 0))
    keyed = pl.BlockSpec((None, length, None, key_dim), lambda b, h, j: (b, 0, h, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, value_dim // value_block),
        in_specs=[
            keyed,
            pl.BlockSpec((None, length, None, value_block), lambda b, h, j: (b, 0, h, j)),
            keyed,
            keyed,
            pl.BlockSpec((None, length, None), lambda b, h, j: (b, 0, h)),
            pl.BlockSpec((None, None, lam_rows.shape[2], length), lambda b, h, j: (b, h, 0, 0)),
            *ranks_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_chunks, num_levels, key_dim, value_block),
                         lambda b, h, j: (b, h, 0, 0, 0, j)),
            pl.BlockSpec((None, None, num_chunks, key_dim, value_block), lambda b, h, j: (b, h, 0, 0, j)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, num_chunks, num_levels, key_dim, value_dim), cotangent_dtype),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), cotangent_dtype),
        ],
        name="loglinear_gdn_level_cotangents",
        **launch_options(interpret, num_warps),
    )(read_queries, d_out, w, decayed_keys, cum, lam_rows, *ranks_operands)


def _level_read_grads_kernel(read_queries_ref, d_out_ref, lam_ref, states_ref, *refs, in_chunk_levels: int,
                             cross_levels: int, value_block: int):
    """One chunk: ``dQ̂`` and the chunk levels' ``dλ`` of its level reads (module docstring, part 2)."""
    ranks_ref, (d_queries_ref, d_lam_ref) = optional_ref(refs, 2)
    read_queries = read_queries_ref[...]  # Q̂  [C, K]
    chunk, key_dim = read_queries.shape
    zeros = jnp.zeros((chunk,), jnp.float32)  # [C]
    for row in range(d_lam_ref.shape[0]):  # the in-chunk levels' λ gradients come from the per-chunk map
        d_lam_ref[row] = zeros
    rank = chunk_rank(ranks_ref, pl.program_id(2))

    def read_level(d_queries, level):  # one [C, K] float32 sum live: λ scales each block's dO S^{(j)ᵀ}
        weight = lam_ref[in_chunk_levels + level][:, None]  # λ^{(L0+j)}  [C, 1]
        d_weight = zeros  # dλ^{(L0+j)}  [C]
        for start in range(0, d_out_ref.shape[1], value_block):
            cols = pl.ds(start, value_block)
            d_out = d_out_ref[:, cols]  # [C, BV]
            state = states_ref[level, :, cols].astype(d_out.dtype)  # S^{(j)}_n  [K, BV]
            d_queries = d_queries + weight * dot_transposed_rhs(d_out, state)
            d_weight = d_weight + jnp.sum(d_out.astype(jnp.float32) * dot(read_queries, state), axis=1)
        return d_queries, d_weight

    d_queries = jnp.zeros((chunk, key_dim), jnp.float32)  # [C, K]
    for level in range(cross_levels):
        d_queries, d_weight = jax.lax.cond(reads_level(rank, level),
                                           functools.partial(read_level, level=level),
                                           lambda d_queries: (d_queries, zeros), d_queries)
        d_lam_ref[in_chunk_levels + level] = d_weight
    d_queries_ref[...] = d_queries


def level_read_grads(read_queries: jax.Array, d_out: jax.Array, lam_rows: jax.Array, states: jax.Array, *,
                     chunk: int, in_chunk_levels: int, cross_levels: int, value_block: int,
                     num_warps: int | None = None, ranks: jax.Array | None = None,
                     interpret=None) -> tuple[jax.Array, jax.Array]:
    """(``dQ̂ [B, T', H, K]``, ``dλ`` rows ``[B, H, R, T']`` with only the chunk levels' rows non-zero), float32.

    ``read_queries`` (Q̂) ``[B, T', H, K]``, ``d_out [B, T', H, V]`` (both in the states' dtype for bf16 products),
    ``lam_rows [B, H, R, T']`` (``level_inputs.level_rows``), ``states [B, H, N, Lc, K, V]``
    (``kernel_fwd.level_states``), ``ranks`` as there."""
    batch, length, heads, key_dim = read_queries.shape
    value_dim = d_out.shape[3]
    num_levels, rows = states.shape[3], lam_rows.shape[2]
    kernel = functools.partial(_level_read_grads_kernel, in_chunk_levels=in_chunk_levels, cross_levels=cross_levels,
                               value_block=value_block)
    keyed = pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n: (b, n, h, 0))
    lam_spec = pl.BlockSpec((None, None, rows, chunk), lambda b, h, n: (b, h, 0, n))
    ranks_specs, ranks_operands = runs_operand(ranks, chunk, lambda b, h, n: (b, n))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, length // chunk),
        in_specs=[
            keyed,
            pl.BlockSpec((None, chunk, None, value_dim), lambda b, h, n: (b, n, h, 0)),
            lam_spec,
            pl.BlockSpec((None, None, None, num_levels, key_dim, value_dim), lambda b, h, n: (b, h, n, 0, 0, 0)),
            *ranks_specs,
        ],
        out_specs=[keyed, lam_spec],
        out_shape=[jax.ShapeDtypeStruct(read_queries.shape, jnp.float32),
                   jax.ShapeDtypeStruct(lam_rows.shape, jnp.float32)],
        name="loglinear_gdn_level_read_grads",
        **launch_options(interpret, num_warps),
    )(read_queries, d_out, lam_rows, states, *ranks_operands)


def _transition_cotangents_kernel(carried_ref, states_ref, *refs, cross_levels: int, key_block: int):
    """One chunk: ``P_n = Σ_{j: bit j of n} E^{(j)}_n S^{(j)ᵀ}_n`` (module docstring, part 3; with ranks, bit j of
    the rank)."""
    ranks_ref, (d_transition_ref,) = optional_ref(refs, 1)
    key_dim = d_transition_ref.shape[1]
    rank = chunk_rank(ranks_ref, pl.program_id(2))
    for start in range(0, key_dim, key_block):
        rows = pl.ds(start, key_block)

        def add_level(total, level):
            return total + dot_transposed_rhs(carried_ref[level, rows, :], states_ref[level])  # [BK, K]

        total = jnp.zeros((key_block, key_dim), jnp.float32)  # rows of P_n  [BK, K]
        for level in range(cross_levels):
            total = jax.lax.cond(reads_level(rank, level), functools.partial(add_level, level=level),
                                 lambda total: total, total)
        d_transition_ref[rows, :] = total


def transition_cotangents(carried: jax.Array, states: jax.Array, *, cross_levels: int, key_block: int,
                          num_warps: int | None = None, ranks: jax.Array | None = None, interpret=None) -> jax.Array:
    """``P [B, H, N, K, K]`` float32 from ``carried`` (E, ``level_cotangents``) and ``states``
    (``kernel_fwd.level_states``), both ``[B, H, N, Lc, K, V]`` in one dtype; ``ranks [B, N·C]`` as there."""
    batch, heads, num_chunks, num_levels, key_dim, value_dim = states.shape
    kernel = functools.partial(_transition_cotangents_kernel, cross_levels=cross_levels, key_block=key_block)
    per_chunk = pl.BlockSpec((None, None, None, num_levels, key_dim, value_dim), lambda b, h, n: (b, h, n, 0, 0, 0))
    chunk = None if ranks is None else ranks.shape[1] // num_chunks
    ranks_specs, ranks_operands = runs_operand(ranks, chunk, lambda b, h, n: (b, n))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, num_chunks),
        in_specs=[per_chunk, per_chunk, *ranks_specs],
        out_specs=pl.BlockSpec((None, None, None, key_dim, key_dim), lambda b, h, n: (b, h, n, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, key_dim), jnp.float32),
        name="loglinear_gdn_transition_cotangents",
        **launch_options(interpret, num_warps),
    )(carried, states, *ranks_operands)
