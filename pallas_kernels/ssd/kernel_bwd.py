"""SSD backward kernels (chunkwise form), head-major layout, T padded to whole chunks.

With ``S_n`` the state entering chunk n, ``c`` the within-chunk cumulative log gates, ``L_ts = exp(c_t − c_s)``
(s ≤ t) and ``dO`` the output cotangent, the forward ``O = ((Q Kᵀ) ⊙ L) V + exp(c) ⊙ (Q S_n)``,
``S_{n+1} = exp(c_last) S_n + (K ⊙ exp(c_last − c))ᵀ V`` gives two passes:

1. ``chunk_state_grads``: one program per (batch, head, key block, value block) walks the chunks backwards from
   the final-state cotangent, storing ``dS_{n+1}`` (the cotangent of the state leaving chunk n) and updating
   ``dS_n = exp(c_last) dS_{n+1} + (Q ⊙ exp(c))ᵀ dO``; what is left at the start is the initial-state gradient.
2. ``chunk_grads``: one program per (batch, group, chunk), looping over the group's heads, all in parallel:

       dQ = ((dO Vᵀ) ⊙ L) K        + exp(c) ⊙ (dO S_nᵀ)
       dK = ((dO Vᵀ) ⊙ L)ᵀ Q       + exp(c_last − c) ⊙ (V dS_{n+1}ᵀ)
       dV = ((Q Kᵀ) ⊙ L)ᵀ dO       + exp(c_last − c) ⊙ (K dS_{n+1})

   dQ and dK summed over the group's heads, and per head and token ``q_t·dq_t − k_t·dk_t`` (with that head's
   own dq, dk): the cotangent of the global cumulative log gate ``C_t`` apart from the final state's
   ``<dS_final, S_final>`` at the last token. The gate gradient is its reverse cumulative sum (``api.py``).

Layouts as in ``kernel_fwd`` (head-major, or time-major with ``time_major=True``). Products accumulate in
float32; the stored state cotangents are in ``q``'s dtype (matmul operands only). Packed sequences: the optional
``runs [B, T]`` int32 operand masks every decay factor above (``common``), so the gate cotangents only hold the
unmasked terms; without it the kernels are the single-sequence ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ssd.common import (carry_decay, causal_decay, chunk_runs, dot, dot_transposed_lhs,
                                       dot_transposed_rhs, head_index, last_row, launch_options, read_decay,
                                       runs_operand, sequential_state_pass, token_dims, token_spec, write_decay)


def _chunk_state_grads_kernel(q_ref, dout_ref, cum_ref, dfinal_ref, *refs, chunk: int, num_chunks: int):
    """Reverse over chunks: store ``dS_{n+1}``, then ``dS ← exp(c_last) dS + (q ⊙ exp(c))ᵀ dO`` (each factor
    masked by the segment runs when ``refs`` starts with a runs ref: ``common``)."""
    *optional, dstates_ref, dinitial_ref = refs
    runs_ref = optional[0] if optional else None

    def step(i, dstate):  # dstate [BK, BV] float32
        n = num_chunks - 1 - i
        dstates_ref[n] = dstate.astype(dstates_ref.dtype)
        rows = pl.ds(n * chunk, chunk)
        q = q_ref[rows, :]  # [C, BK]
        dout = dout_ref[rows, :]  # [C, BV]
        cum = cum_ref[rows]  # [C]
        cum_last = last_row(cum_ref, n * chunk, chunk)  # [1]
        runs, run_last = chunk_runs(runs_ref, n * chunk, chunk)  # [C], [1] (None without segments)
        decayed_q = (q.astype(jnp.float32) * read_decay(cum, runs)[:, None]).astype(dout.dtype)  # [C, BK]
        return carry_decay(cum_last, run_last)[:, None] * dstate + dot_transposed_lhs(decayed_q, dout)

    dinitial_ref[...] = jax.lax.fori_loop(0, num_chunks, step, dfinal_ref[...].astype(jnp.float32))


def _chunk_grads_kernel(q_ref, k_ref, v_ref, dout_ref, cum_ref, state_ref, dstate_ref, *refs, chunk: int,
                        heads_per_group: int, time_major: bool):
    """One chunk of one head group: dQ, dK (summed over the group), dV and ``q·dq − k·dk`` per head (segment
    masks from the runs ref when ``refs`` starts with one: ``common``)."""
    *optional, dq_ref, dk_ref, dv_ref, gate_ref = refs
    runs, run_last = chunk_runs(optional[0] if optional else None, 0, chunk)  # [C], [1] (None without segments)
    q, k = q_ref[...], k_ref[...]  # [C, K] each
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = dot_transposed_rhs(q, k)  # [C, C] Q Kᵀ, shared by the group's heads
    dq = jnp.zeros(q.shape, jnp.float32)  # [C, K]
    dk = jnp.zeros(k.shape, jnp.float32)  # [C, K]
    for head in range(heads_per_group):
        this_head = head_index(head, time_major)
        v, dout = v_ref[this_head], dout_ref[this_head]  # [C, V] each
        cum = cum_ref[head]  # [C]
        cum_last = cum_ref[head, pl.ds(chunk - 1, 1)]  # [1]
        state = state_ref[head].astype(q.dtype)  # [K, V] S_n
        dstate = dstate_ref[head].astype(q.dtype)  # [K, V] dS_{n+1}
        decay = causal_decay(cum, runs)  # [C, C]
        written = write_decay(cum, cum_last, runs, run_last)[:, None]  # [C, 1]
        dweights = (dot_transposed_rhs(dout, v) * decay).astype(q.dtype)  # [C, C] (dO Vᵀ) ⊙ L
        dq_head = dot(dweights, k) + read_decay(cum, runs)[:, None] * dot_transposed_rhs(dout, state)  # [C, K]
        dk_head = dot_transposed_lhs(dweights, q) + written * dot_transposed_rhs(v, dstate)  # [C, K]
        weights = (scores * decay).astype(dout.dtype)  # [C, C] (Q Kᵀ) ⊙ L
        dv = dot_transposed_lhs(weights, dout) + written * dot(k, dstate)  # [C, V]
        dv_ref[this_head] = dv.astype(dv_ref.dtype)
        gate_ref[head] = jnp.sum(q32 * dq_head, axis=1) - jnp.sum(k32 * dk_head, axis=1)
        dq, dk = dq + dq_head, dk + dk_head
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


def chunk_state_grads(q: jax.Array, dout: jax.Array, cum: jax.Array, dfinal: jax.Array, *, chunk: int,
                      value_block: int, key_block: int, num_warps: int | None = None,
                      num_stages: int | None = None, time_major: bool = False, interpret=None,
                      runs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cotangents of the states leaving every chunk ``[B, H, N, K, V]`` in ``q``'s dtype and the initial-state
    gradient ``[B, H, K, V]`` float32. ``time_major``: ``q, dout`` are ``[B, T, X, D]``; ``runs [B, T]`` int32:
    the segment runs of packed sequences (``common``), None for one sequence per row."""
    return sequential_state_pass(_chunk_state_grads_kernel, q, dout, cum, dfinal, chunk=chunk, key_block=key_block,
                                 value_block=value_block, num_warps=num_warps, num_stages=num_stages,
                                 time_major=time_major, interpret=interpret, name="ssd_chunk_state_grads",
                                 runs=runs)


def chunk_grads(q: jax.Array, k: jax.Array, v: jax.Array, dout: jax.Array, cum: jax.Array, states: jax.Array,
                dstates: jax.Array, *, chunk: int, num_warps: int | None = None, time_major: bool = False,
                interpret=None, runs: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``dq, dk`` (layout and dtype of q, k), ``dv`` (of v) and the per-token gate cotangents
    ``q·dq − k·dk`` ``[B, H, T]`` float32 (module docstring; ``runs`` as in ``chunk_state_grads``)."""
    batch, length, groups, key_dim = token_dims(q, time_major)
    heads, value_dim = token_dims(v, time_major)[2:]
    group_of = heads // groups
    kernel = functools.partial(_chunk_grads_kernel, chunk=chunk, heads_per_group=group_of, time_major=time_major)
    group_rows = token_spec(time_major, None, chunk, key_dim, lambda b, g, n: (b, g, n, 0))
    head_rows = token_spec(time_major, group_of, chunk, value_dim, lambda b, g, n: (b, g, n, 0))
    head_states = pl.BlockSpec((None, group_of, None, key_dim, value_dim), lambda b, g, n: (b, g, n, 0, 0))
    head_gates = pl.BlockSpec((None, group_of, chunk), lambda b, g, n: (b, g, n))
    runs_specs, runs_operands = runs_operand(runs, chunk, lambda b, g, n: (b, n))
    return pl.pallas_call(
        kernel,
        grid=(batch, groups, length // chunk),
        in_specs=[group_rows, group_rows, head_rows, head_rows, head_gates, head_states, head_states, *runs_specs],
        out_specs=[group_rows, group_rows, head_rows, head_gates],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(cum.shape, jnp.float32)],
        name="ssd_chunk_grads",
        **launch_options(interpret, num_warps),
    )(q, k, v, dout, cum, states, dstates, *runs_operands)
