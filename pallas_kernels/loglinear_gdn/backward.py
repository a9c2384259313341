"""Backward of the log-linear Gated DeltaNet kernels (``backward="kernels"`` / ``"chunk_vjp"``): the reverse
level-cotangent kernel on the forward's stored level states, the level-read gradient kernel, then the per-chunk
gradients of all chunks at once.

Every input of chunk n reaches the loss only through (notation of ``kernel_fwd``)

    O_n = ((A 𝒯 diag(β)) ⊙ Λ) V + Σ_j λ^{(L0+j)} ⊙ (Q̂ S^{(j)}_n),   M_n S^{(j)}_n for every level j,   X_n = K̃ᵀ U₀,

because the boundary update that consumes ``M_n S^{(j)}_n`` and ``X_n`` has no other inputs; with the level
states ``S^{(j)}_n`` held fixed (the forward stored them) and the cotangents ``dO_n``, ``E^{(j)}_n``, ``dX_n``
(``kernel_bwd.level_cotangents``), the VJP of this map is the whole sequence's gradient. The level states enter
it only bilinearly, so it factors through the level-free per-chunk map ``chunk_map``

    inputs of chunk n  ->  (O_loc = ((A 𝒯 diag(β)) ⊙ Λ) V,  Q̂,  M_n = γ_C I − K̃ᵀ W,  X_n)

with the cotangents ``dO``, ``dQ̂ = Σ_j diag(λ^{(L0+j)}) dO S^{(j)ᵀ}`` (``kernel_bwd.level_read_grads``, which also
gives the chunk levels' ``dλ``) and ``P_n = Σ_j E^{(j)}_n S^{(j)ᵀ}_n`` (the cotangent of ``M_n``: ``dγ_C = tr P_n``,
``dK̃ = −W P_nᵀ``, ``dW = −K̃ P_n``; ``kernel_bwd.transition_cotangents``, one contraction over the read levels
and the value dim). The per-chunk step is ``kernel_chunk_bwd.chunk_grads`` (``"kernels"``; per head, ``dq, dk``
then summed over each group) or the XLA VJP of ``chunk_map`` (``"chunk_vjp"``: the UT transform of
``jaxlm.ops.loglinear_chunks.delta_chunk_terms`` differentiated by JAX).

Order: ``level_cotangents`` (sequential, Pallas; it reads the ``Q̂`` the forward's output kernel stored), then
``transition_cotangents`` and ``level_read_grads`` (all chunks in parallel, Pallas), the per-chunk step. Float32
inputs: float32 products.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.ops.delta_rule_chunked import expand_head_groups, pad_time
from jaxlm.ops.loglinear_chunks import delta_chunk_terms, level_weights
from pallas_kernels.gdn.api import sum_over_group
from pallas_kernels.loglinear_gdn.kernel_bwd import level_cotangents, level_read_grads, transition_cotangents
from pallas_kernels.loglinear_gdn.kernel_chunk_bwd import chunk_grads
from pallas_kernels.loglinear_gdn.level_inputs import level_columns, level_rows


def chunk_levels(length: int, chunk: int, rank_chunks: int | None = None) -> tuple[int, int]:
    """(in-chunk levels ``log2 C + 1``, chunk levels ``bit_length(N − 1)``) of ``length`` tokens in chunks, or of
    segments spanning at most ``rank_chunks`` chunks (the segment row layout)."""
    num_chunks = rank_chunks or -(-length // chunk)
    return chunk.bit_length(), (num_chunks - 1).bit_length()


def head_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """``[B, T', H, ...] -> [B, H, N, C, ...]`` with ``T' = N·C``."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]), 3, 1)


def time_major(x: jax.Array) -> jax.Array:
    """``[B, H, N, C, D] -> [B, N·C, H, D]`` (the inverse of ``head_chunks``)."""
    batch, heads, num_chunks, chunk, dim = x.shape
    return jnp.moveaxis(x, 1, 3).reshape(batch, num_chunks * chunk, heads, dim)


def chunk_map(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array, lam: jax.Array,
              chunk: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The level-free per-chunk map of the module docstring, float32, T padded to ``T' = N·C``.

    ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a, beta [B, T, H]``, ``lam [B, T, H, L]`` -> (the in-chunk
    levels' outputs ``((A 𝒯 diag(β)) ⊙ Λ) V`` ``[B, T, H, V]``, ``Q̂ = diag(γ) Q − A W`` ``[B, H, N, C, K]``,
    ``M_n = γ_C I − K̃ᵀ W`` ``[B, H, N, K, K]``, ``X_n = K̃ᵀ U₀`` ``[B, H, N, K, V]``).
    """
    length, heads = v.shape[1:3]
    padding = -length % chunk
    in_chunk = chunk.bit_length()

    def to_chunks(x: jax.Array) -> jax.Array:  # [B, T, H, ...] -> [B, H, N, C, ...] float32
        return head_chunks(pad_time(x.astype(jnp.float32), padding), chunk)

    q_c, k_c = (to_chunks(expand_head_groups(x, heads)) for x in (q, k))  # [B, H, N, C, K]
    v_c, log_a_c, beta_c = to_chunks(v), to_chunks(log_a), to_chunks(beta)  # [B, H, N, C(, V)]
    lam_c = to_chunks(level_columns(lam, in_chunk))  # [B, H, N, C, L0]: the in-chunk levels
    terms = delta_chunk_terms(q_c, k_c, log_a_c, beta_c)
    num_chunks = q_c.shape[2]
    positions = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(1, num_chunks, chunk)  # [1, N, C]
    weights = terms.pair_weights * level_weights(lam_c, positions, jnp.zeros_like(positions))  # [B, H, N, C, C]
    local_out = time_major(jnp.einsum("bhnts,bhnsv->bhntv", weights, v_c))[:, :length]  # [B, T, H, V]
    writes = jnp.einsum("bhnck,bhncv->bhnkv", terms.key_to_end, v_c)  # X_n  [B, H, N, K, V]
    return local_out, terms.query_from_state, terms.chunk_transition, writes


class Saved(NamedTuple):
    """What the forward keeps for the kernel backward: padded to ``T' = N·C``, time-major."""

    w: jax.Array  # W  [B, T', H, K]
    decayed_keys: jax.Array  # K̃  [B, T', H, K]
    cum: jax.Array  # g  [B, T', H] float32
    beta: jax.Array  # β  [B, T', H] float32
    inverse: jax.Array  # 𝒯  [B, T', H, C] float32
    read_queries: jax.Array  # Q̂  [B, T', H, K] in q's dtype
    states: jax.Array  # level states  [B, H, N, Lc, K, V] in q's dtype
    ranks: jax.Array | None  # the segment row layout's per-token ranks [B, T'] int32, or None


class LevelCotangents(NamedTuple):
    """The cotangents the level states pass to the per-chunk step (module docstring), padded, float32."""

    d_queries: jax.Array  # dQ̂  [B, T', H, K]
    d_lam_rows: jax.Array  # dλ of the chunk levels' rows  [B, H, R, T']
    d_transitions: jax.Array  # P_n  [B, H, N, K, K]
    d_writes: jax.Array  # dX_n  [B, H, N, K, V] (q's dtype)


def kernel_backward(blocks, interpret, inputs: tuple, saved: Saved, d_out: jax.Array,
                    rank_chunks: int | None = None) -> tuple:
    """Gradients of ``(q, k, v, log_a, β, λ)`` (module docstring); the per-chunk step is the kernel of
    ``kernel_chunk_bwd`` (``blocks.backward == "kernels"``) or the XLA VJP of ``chunk_map`` (``"chunk_vjp"``).
    ``rank_chunks``: as in ``chunk_levels`` (with ``saved.ranks``)."""
    q, lam = inputs[0], inputs[5]
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    in_chunk, cross = chunk_levels(length, chunk, rank_chunks)
    precision = "float32" if inputs[2].dtype == jnp.float32 else None
    with jax.default_matmul_precision(precision):
        d_out_p = pad_time(d_out.astype(q.dtype), padding)  # [B, T', H, V]
        lam_rows, rows_vjp = jax.vjp(lambda lam: level_rows(lam, padding, in_chunk + cross), lam)  # [B, H, R, T']
        levels = _level_cotangents(blocks, interpret, saved, d_out_p, lam_rows, in_chunk, cross, rank_chunks)
        if blocks.backward == "chunk_vjp":
            *grads, d_lam = _chunk_vjp_grads(blocks, inputs, d_out, levels, in_chunk + cross)
        else:
            *grads, d_lam = _chunk_kernel_grads(blocks, interpret, inputs, saved, d_out_p, lam_rows, levels)
        (d_lam_total,) = rows_vjp(d_lam + levels.d_lam_rows)
    return (*grads, d_lam_total)


def _level_cotangents(blocks, interpret, saved: Saved, d_out_p, lam_rows, in_chunk: int, cross: int,
                      rank_chunks: int | None) -> LevelCotangents:
    """The reverse level-cotangent, transition-cotangent (``P_n``) and level-read gradient kernels."""
    carried, writes = level_cotangents(
        saved.read_queries, d_out_p, saved.w, saved.decayed_keys, saved.cum, lam_rows, chunk=blocks.chunk,
        in_chunk_levels=in_chunk, value_block=blocks.cotangent_value_block or blocks.state_value_block,
        cotangent_dtype=d_out_p.dtype, num_warps=blocks.state_warps, ranks=saved.ranks, rank_chunks=rank_chunks,
        interpret=interpret)  # E [B, H, N, Lc, K, V], dX [B, H, N, K, V]
    transitions = transition_cotangents(carried, saved.states, cross_levels=cross,
                                        key_block=blocks.transition_key_block or carried.shape[4],
                                        num_warps=blocks.output_warps, ranks=saved.ranks,
                                        interpret=interpret)  # P_n  [B, H, N, K, K]
    d_queries, d_lam_rows = level_read_grads(
        saved.read_queries, d_out_p, lam_rows, saved.states, chunk=blocks.chunk, in_chunk_levels=in_chunk,
        cross_levels=cross, value_block=blocks.output_value_block, num_warps=blocks.output_warps,
        ranks=saved.ranks, interpret=interpret)  # dQ̂ [B, T', H, K], dλ rows [B, H, R, T']
    return LevelCotangents(d_queries, d_lam_rows, transitions, writes)


def _chunk_kernel_grads(blocks, interpret, inputs, saved: Saved, d_out_p, lam_rows, levels: LevelCotangents):
    """``(dq, dk, dv, d log_a, dβ, dλ rows)`` from ``kernel_chunk_bwd.chunk_grads``; ``dq, dk`` summed over each
    group's heads."""
    q, k, v, log_a, beta, _ = inputs
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    dq, dk, dv, d_beta, d_log_a, d_lam_rows = chunk_grads(
        pad_time(q, padding), pad_time(k, padding), pad_time(v, padding), d_out_p, saved.w, saved.inverse,
        saved.beta, saved.cum, lam_rows, levels.d_queries, levels.d_transitions, levels.d_writes, chunk=chunk,
        in_chunk_levels=chunk.bit_length(), float32_dots=blocks.grad_float32_dots, num_warps=blocks.grad_warps,
        interpret=interpret)
    dq, dk = (sum_over_group(x[:, :length], q.shape[2]).astype(q.dtype) for x in (dq, dk))  # [B, T, G, K]
    return (dq, dk, dv[:, :length], d_log_a[:, :length].astype(log_a.dtype), d_beta[:, :length].astype(beta.dtype),
            d_lam_rows)


def _chunk_vjp_grads(blocks, inputs, d_out, levels: LevelCotangents, num_level_rows: int):
    """``(dq, dk, dv, d log_a, dβ, dλ rows)`` from the XLA VJP of ``chunk_map`` (its in-chunk ``dλ`` laid out as
    ``num_level_rows`` λ rows, so the caller adds the chunk levels' rows and maps them back once)."""
    chunk = blocks.chunk
    lam = inputs[5]
    _, chunk_vjp = jax.vjp(lambda *x: chunk_map(*x, chunk=chunk), *inputs[:5], level_columns(lam, chunk.bit_length()))
    *grads, d_columns = chunk_vjp((d_out.astype(jnp.float32), head_chunks(levels.d_queries, chunk),
                                   levels.d_transitions, levels.d_writes.astype(jnp.float32)))
    return (*grads, level_rows(d_columns, -lam.shape[1] % chunk, num_level_rows))
