"""Log-linear SSD backward kernels (the transpose of ``kernel_fwd``), time-major layout, T padded to whole chunks.

With ``H_b`` the stored boundary states, ``X_n = (K ⊙ exp(c_last − c))ᵀ V`` chunk n's own keys,
``r^{(j)}`` the read weights and ``dO`` the output cotangent:

1. ``level_cotangents``: one program per (batch, head, key block, value block) walks the chunks backwards
   with one stack of ``ceil(log2 N)`` level cotangents ``W_j`` on chip. Slot ``b`` (``m = lssb(b)``) is read
   by the chunks ``n ∈ [b, b + 2^m)`` at level ``m``, so
   ``dH_b = Σ_n D(b → n) (Q_n ⊙ u^{(m)}_n)ᵀ dO_n`` with ``u^{(j)}_t = λ_t^{(log2 C + 1 + j)} exp(c_t)`` the read
   weights without the carried decay ``D(b → n) = Π_{i=b}^{n−1} a_i``; and slot ``b`` was merged into slot
   ``b + 2^m`` (the Fenwick update chain), so the cotangent of ``X_{b−1}`` is
   ``E_b = dH_b + D(b → b + 2^m) E_{b + 2^m}``. Both sums decay alike, so one stack holds them: at chunk ``n``
   (``m = lssb(n)``)::

       W_j += (Q_n ⊙ u^{(j)}_n)ᵀ dO_n  (bit j of n set),   E_n = W_m,   W_j ← E_n (j < m),   W ← a_{n−1} W

   and the pass stores ``dX_{n−1} = E_n`` (``dX_{N−1} = 0``). (After ``W_m`` is read at slot ``n``, no chunk
   adds to it before the next slot with a higher lowest set bit overwrites it.)
2. ``chunk_grads``: one program per (batch, group, chunk), looping over the group's heads, all in parallel::

       dQ = ((dO Vᵀ) ⊙ L ⊙ Λ) K + Σ_{j: bit j of n} r^{(j)} ⊙ (dO H_{n_j}ᵀ)
       dK = ((dO Vᵀ) ⊙ L ⊙ Λ)ᵀ Q + exp(c_last − c) ⊙ (V dX_nᵀ)
       dV = ((Q Kᵀ) ⊙ L ⊙ Λ)ᵀ dO + exp(c_last − c) ⊙ (K dX_n)
       dλ_t^{(ℓ)} = Σ_{s: level(t,s)=ℓ} (dO Vᵀ ⊙ Q Kᵀ ⊙ L)_ts,   dr^{(j)}_t = dO_t · (q_t H_{n_j})

   dQ and dK summed over the group's heads, and per head and token ``q_t·dq_t − k_t·dk_t``: the output
   depends on the gates only through the global cumulative log gate ``C`` (``exp(C_t − C_s)``, λ does not
   depend on it), so that is ``∂L/∂C_t`` and the gate gradient is its reverse cumulative sum (``api``).

Products accumulate in float32; the stored cotangents are in ``q``'s dtype (matmul operands only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.loglinear.kernel_fwd import (chunk_rank, in_chunk_level_masks, in_chunk_level_weights,
                                                 merge_masks, optional_ref, read_slot, reads_level)
from pallas_kernels.ssd.common import (causal_decay, dot, dot_transposed_lhs, dot_transposed_rhs, head_index,
                                       last_row, launch_options, runs_operand, token_dims, token_spec)


def _level_cotangents_kernel(q_ref, dout_ref, cum_ref, bucket_ref, *refs, chunk: int, num_chunks: int,
                             cross_levels: int):
    """Reverse over chunks with the level cotangents ``W`` on chip (module docstring, part 1). With ranks the
    counter is the rank; at a rank-0 chunk every level is below ``lssb(0)``, so ``dX_{n−1} = 0`` and the stack
    restarts from zeros for the previous segment."""
    ranks_ref, (dstates_ref,) = optional_ref(refs, 1)
    zeros = jnp.zeros(dstates_ref.shape[1:], jnp.float32)  # [BK, BV]
    dstates_ref[num_chunks - 1] = zeros.astype(dstates_ref.dtype)

    def step(i, levels):  # levels: tuple of [BK, BV] float32 W_j, at the start of chunk n
        n = num_chunks - 1 - i
        rank = chunk_rank(ranks_ref, n, n * chunk)
        rows = pl.ds(n * chunk, chunk)
        q = q_ref[rows, :].astype(jnp.float32)  # [C, BK]
        dout = dout_ref[rows, :]  # [C, BV]

        def add_bucket_term(total, level):
            weighted_q = (q * bucket_ref[level, rows][:, None]).astype(dout.dtype)  # [C, BK]
            return total + dot_transposed_lhs(weighted_q, dout)

        levels = [jax.lax.cond(reads_level(rank, level), functools.partial(add_bucket_term, level=level),
                               lambda total: total, total) for level, total in enumerate(levels)]
        masks = [merge_masks(rank, level) for level in range(cross_levels)]
        entering = zeros
        for (_, at), total in zip(masks, levels):
            entering = entering + jnp.where(at, total, 0.0)
        dstates_ref[n - 1] = entering.astype(dstates_ref.dtype)
        decay = jnp.exp(last_row(cum_ref, (n - 1) * chunk, chunk))[:, None]  # [1, 1] a_{n−1}
        return tuple(decay * jnp.where(below, entering, total) for (below, _), total in zip(masks, levels))

    jax.lax.fori_loop(0, num_chunks - 1, step, tuple(zeros for _ in range(cross_levels)))


def level_cotangents(q: jax.Array, dout: jax.Array, cum: jax.Array, bucket_rows: jax.Array, *, chunk: int,
                     cross_levels: int, key_block: int, value_block: int, num_warps: int | None = None,
                     ranks: jax.Array | None = None, interpret=None) -> jax.Array:
    """``dX_n`` of every chunk ``[B, H, N, K, V]`` in ``q``'s dtype. ``q [B, T', G, K]``, ``dout [B, T', H, V]``
    time-major, ``cum [B, H, T']``, ``bucket_rows [B, H, R_x, T']`` (the weights ``u^{(j)}``), ``ranks [B, T']``
    as in ``kernel_fwd.level_states``."""
    batch, length, groups, key_dim = token_dims(q, True)
    heads, value_dim = token_dims(dout, True)[2:]
    group_of, num_chunks = heads // groups, length // chunk
    kernel = functools.partial(_level_cotangents_kernel, chunk=chunk, num_chunks=num_chunks,
                               cross_levels=cross_levels)
    ranks_specs, ranks_operands = runs_operand(ranks, length, lambda b, h, i, j: (b, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, key_dim // key_block, value_dim // value_block),
        in_specs=[
            token_spec(True, None, length, key_block, lambda b, h, i, j: (b, h // group_of, 0, i)),
            token_spec(True, None, length, value_block, lambda b, h, i, j: (b, h, 0, j)),
            pl.BlockSpec((None, None, length), lambda b, h, i, j: (b, h, 0)),
            pl.BlockSpec((None, None, bucket_rows.shape[2], length), lambda b, h, i, j: (b, h, 0, 0)),
            *ranks_specs,
        ],
        out_specs=pl.BlockSpec((None, None, num_chunks, key_block, value_block), lambda b, h, i, j: (b, h, 0, i, j)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), q.dtype),
        name="loglinear_level_cotangents",
        **launch_options(interpret, num_warps),
    )(q, dout, cum, bucket_rows, *ranks_operands)


def _chunk_grads_kernel(q_ref, k_ref, v_ref, dout_ref, cum_ref, lam_ref, read_ref, states_ref, dstates_ref, *refs,
                        chunk: int, heads_per_group: int, in_chunk_levels: int, cross_levels: int):
    """One chunk of one head group (module docstring, part 2; with ranks the reads of ``kernel_fwd``)."""
    ranks_ref, (dq_ref, dk_ref, dv_ref, gate_ref, dlam_ref, dread_ref) = optional_ref(refs, 6)
    q, k = q_ref[...], k_ref[...]  # [C, K] each
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = dot_transposed_rhs(q, k)  # [C, C] Q Kᵀ, shared by the group's heads
    masks = in_chunk_level_masks(chunk, in_chunk_levels)
    chunk_index = pl.program_id(2)
    rank = chunk_rank(ranks_ref, chunk_index)
    dq = jnp.zeros(q.shape, jnp.float32)  # [C, K]
    dk = jnp.zeros(k.shape, jnp.float32)  # [C, K]
    for head in range(heads_per_group):
        this_head = head_index(head, True)
        v, dout = v_ref[this_head], dout_ref[this_head]  # [C, V] each
        cum = cum_ref[head]  # [C]
        cum_last = cum_ref[head, pl.ds(chunk - 1, 1)]  # [1]
        decay = causal_decay(cum)  # [C, C]
        level_weights = in_chunk_level_weights(masks, [lam_ref[head, level] for level in range(in_chunk_levels)])
        decayed_dscores = dot_transposed_rhs(dout, v) * decay  # [C, C] (dO Vᵀ) ⊙ L
        level_terms = decayed_dscores * scores  # [C, C]
        for level in range(lam_ref.shape[1]):
            dlam_ref[head, level] = (jnp.sum(jnp.where(masks[level], level_terms, 0.0), axis=1)
                                     if level < in_chunk_levels else jnp.zeros((chunk,), jnp.float32))
        dweights = (decayed_dscores * level_weights).astype(q.dtype)  # [C, C]
        weights = (scores * decay * level_weights).astype(dout.dtype)  # [C, C]
        write_decay = jnp.exp(cum_last - cum)[:, None]  # [C, 1]
        dstate = dstates_ref[head].astype(q.dtype)  # [K, V] dX_n
        dq_head = dot(dweights, k)  # [C, K]
        dk_head = dot_transposed_lhs(dweights, q) + write_decay * dot_transposed_rhs(v, dstate)  # [C, K]
        dv = dot_transposed_lhs(weights, dout) + write_decay * dot(k, dstate)  # [C, V]
        for level in range(read_ref.shape[1]):
            if level >= cross_levels:
                dread_ref[head, level] = jnp.zeros((chunk,), jnp.float32)
                continue

            def read_level(dq_head, level=level, head=head, dout=dout):
                state = states_ref[head, chunk_index - rank + read_slot(rank, level)].astype(q.dtype)  # H_{n_j}
                dq_head = dq_head + read_ref[head, level][:, None] * dot_transposed_rhs(dout, state)
                return dq_head, jnp.sum(dout.astype(jnp.float32) * dot(q, state), axis=1)

            dq_head, dread = jax.lax.cond(reads_level(rank, level), read_level,
                                          lambda dq_head: (dq_head, jnp.zeros((chunk,), jnp.float32)), dq_head)
            dread_ref[head, level] = dread
        dv_ref[this_head] = dv.astype(dv_ref.dtype)
        gate_ref[head] = jnp.sum(q32 * dq_head, axis=1) - jnp.sum(k32 * dk_head, axis=1)
        dq, dk = dq + dq_head, dk + dk_head
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


def chunk_grads(q: jax.Array, k: jax.Array, v: jax.Array, dout: jax.Array, cum: jax.Array, lam_rows: jax.Array,
                read_rows: jax.Array, states: jax.Array, dstates: jax.Array, *, chunk: int, in_chunk_levels: int,
                cross_levels: int, num_warps: int | None = None, ranks: jax.Array | None = None,
                interpret=None) -> tuple[jax.Array, ...]:
    """``dq, dk`` (layout and dtype of q, k), ``dv`` (of v), the per-token gate cotangents ``q·dq − k·dk``
    ``[B, H, T']`` and the cotangents of ``lam_rows`` and ``read_rows`` (float32, their shapes). ``ranks`` as in
    ``kernel_fwd.level_states``."""
    batch, length, groups, key_dim = token_dims(q, True)
    heads, value_dim = token_dims(v, True)[2:]
    group_of, num_chunks = heads // groups, length // chunk
    kernel = functools.partial(_chunk_grads_kernel, chunk=chunk, heads_per_group=group_of,
                               in_chunk_levels=in_chunk_levels, cross_levels=cross_levels)
    group_rows = token_spec(True, None, chunk, key_dim, lambda b, g, n: (b, g, n, 0))
    head_rows = token_spec(True, group_of, chunk, value_dim, lambda b, g, n: (b, g, n, 0))
    head_gates = pl.BlockSpec((None, group_of, chunk), lambda b, g, n: (b, g, n))
    lam_block = pl.BlockSpec((None, group_of, lam_rows.shape[2], chunk), lambda b, g, n: (b, g, 0, n))
    read_block = pl.BlockSpec((None, group_of, read_rows.shape[2], chunk), lambda b, g, n: (b, g, 0, n))
    all_states = pl.BlockSpec((None, group_of, num_chunks, key_dim, value_dim), lambda b, g, n: (b, g, 0, 0, 0))
    chunk_state = pl.BlockSpec((None, group_of, None, key_dim, value_dim), lambda b, g, n: (b, g, n, 0, 0))
    ranks_specs, ranks_operands = runs_operand(ranks, chunk, lambda b, g, n: (b, n))
    return pl.pallas_call(
        kernel,
        grid=(batch, groups, num_chunks),
        in_specs=[group_rows, group_rows, head_rows, head_rows, head_gates, lam_block, read_block, all_states,
                  chunk_state, *ranks_specs],
        out_specs=[group_rows, group_rows, head_rows, head_gates, lam_block, read_block],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(cum.shape, jnp.float32),
                   jax.ShapeDtypeStruct(lam_rows.shape, jnp.float32),
                   jax.ShapeDtypeStruct(read_rows.shape, jnp.float32)],
        name="loglinear_chunk_grads",
        **launch_options(interpret, num_warps),
    )(q, k, v, dout, cum, lam_rows, read_rows, states, dstates, *ranks_operands)
