"""SSD forward kernels (Dao & Gu 2024, §6, chunkwise form), head-major layout, T padded to whole chunks.

Two passes, as in the chunkwise algorithm:

1. ``chunk_states``: one program per (batch, head, key block, value block) walks the chunks in order and stores the
   state entering every chunk, ``S_{n+1} = exp(c_last) S_n + (k ⊙ exp(c_last − c))ᵀ v`` with ``c`` the
   within-chunk cumulative log gates; it also writes the final state.
2. ``chunk_outputs``: one program per (batch, head, chunk, value block), all in parallel:
   ``O = ((Q Kᵀ) ⊙ L) V + exp(c) ⊙ (Q S_n)`` with ``L_ts = exp(c_t − c_s)`` for ``s ≤ t``.

Inputs: ``q, k [B, G, T, K]`` (head h reads group h // R), ``v [B, H, T, V]`` (or all time-major,
``[B, T, X, D]``, with ``time_major=True``: no transposes around the kernels), ``cum [B, H, T]`` float32,
``initial [B, H, K, V]`` float32. Products accumulate in float32. The entering states are stored in ``k``'s
dtype: they are only ever used as matmul operands of that dtype, so nothing is lost and bf16 halves their bytes.
Packed sequences: the optional ``runs [B, T]`` int32 operand masks every decay factor (``common``); without it
the kernels are the single-sequence ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ssd.common import (carry_decay, causal_decay, chunk_runs, dot, dot_transposed_lhs,
                                       dot_transposed_rhs, last_row, launch_options, read_decay, runs_operand,
                                       sequential_state_pass, token_dims, token_spec, write_decay)


def _chunk_states_kernel(k_ref, v_ref, cum_ref, initial_ref, *refs, chunk: int, num_chunks: int):
    """Sequential over chunks: store the entering state, then ``S ← exp(c_last) S + (k ⊙ exp(c_last − c))ᵀ v``
    (each factor masked by the segment runs when ``refs`` starts with a runs ref: ``common``)."""
    *optional, states_ref, final_ref = refs
    runs_ref = optional[0] if optional else None

    def step(n, state):  # state [BK, BV] float32
        states_ref[n] = state.astype(states_ref.dtype)
        rows = pl.ds(n * chunk, chunk)
        k = k_ref[rows, :]  # [C, BK]
        v = v_ref[rows, :]  # [C, BV]
        cum = cum_ref[rows]  # [C]
        cum_last = last_row(cum_ref, n * chunk, chunk)  # [1]
        runs, run_last = chunk_runs(runs_ref, n * chunk, chunk)  # [C], [1] (None without segments)
        weighted_k = (k.astype(jnp.float32) * write_decay(cum, cum_last, runs, run_last)[:, None]).astype(k.dtype)
        return carry_decay(cum_last, run_last)[:, None] * state + dot_transposed_lhs(weighted_k, v)

    final_ref[...] = jax.lax.fori_loop(0, num_chunks, step, initial_ref[...].astype(jnp.float32))


def _write_chunk_output(q_ref, k_ref, v_ref, cum_ref, state_ref, out_ref, runs: jax.Array | None):
    """``O = ((Q Kᵀ) ⊙ L) V + exp(c) ⊙ (Q S)`` of one chunk into ``out_ref``; with the segment ``runs [C]``
    every decay factor is masked (``common``)."""
    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [C, K], [C, K], [C, BV]
    cum = cum_ref[...]  # [C] float32
    weights = causal_decay(cum, runs) * dot_transposed_rhs(q, k)  # [C, C] float32
    intra = dot(weights.astype(v.dtype), v)  # [C, BV]
    inter = read_decay(cum, runs)[:, None] * dot(q, state_ref[...].astype(q.dtype))  # [C, BV]
    out_ref[...] = (intra + inter).astype(out_ref.dtype)


def chunk_outputs_kernel(q_ref, k_ref, v_ref, cum_ref, state_ref, out_ref):
    """One chunk: ``O = ((Q Kᵀ) ⊙ L) V + exp(c) ⊙ (Q S)`` (module docstring)."""
    _write_chunk_output(q_ref, k_ref, v_ref, cum_ref, state_ref, out_ref, None)


def segmented_chunk_outputs_kernel(q_ref, k_ref, v_ref, cum_ref, state_ref, runs_ref, out_ref):
    """One chunk of packed sequences: ``chunk_outputs_kernel`` with the segment masks of ``runs_ref [C]``."""
    _write_chunk_output(q_ref, k_ref, v_ref, cum_ref, state_ref, out_ref, runs_ref[...])


def chunk_states(k: jax.Array, v: jax.Array, cum: jax.Array, initial: jax.Array, *, chunk: int,
                 value_block: int, key_block: int, num_warps: int | None = None,
                 num_stages: int | None = None, time_major: bool = False, interpret=None,
                 runs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """States entering every chunk ``[B, H, N, K, V]`` in ``k``'s dtype and the final state ``[B, H, K, V]``
    float32. ``time_major``: ``k, v`` are ``[B, T, X, D]`` instead of ``[B, X, T, D]``; ``runs [B, T]`` int32:
    the segment runs of packed sequences (``common``), None for one sequence per row."""
    return sequential_state_pass(_chunk_states_kernel, k, v, cum, initial, chunk=chunk, key_block=key_block,
                                 value_block=value_block, num_warps=num_warps, num_stages=num_stages,
                                 time_major=time_major, interpret=interpret, name="ssd_chunk_states", runs=runs)


def chunk_outputs(q: jax.Array, k: jax.Array, v: jax.Array, cum: jax.Array, states: jax.Array, *, chunk: int,
                  value_block: int, num_warps: int | None = None, time_major: bool = False,
                  interpret=None, runs: jax.Array | None = None) -> jax.Array:
    """Outputs in ``v``'s layout and dtype from the entering states of ``chunk_states`` (``runs`` as there)."""
    batch, length, groups, key_dim = token_dims(q, time_major)
    heads, value_dim = token_dims(v, time_major)[2:]
    group_of = heads // groups
    runs_specs, runs_operands = runs_operand(runs, chunk, lambda b, h, n, j: (b, n))
    return pl.pallas_call(
        chunk_outputs_kernel if runs is None else segmented_chunk_outputs_kernel,
        grid=(batch, heads, length // chunk, value_dim // value_block),
        in_specs=[
            token_spec(time_major, None, chunk, key_dim, lambda b, h, n, j: (b, h // group_of, n, 0)),
            token_spec(time_major, None, chunk, key_dim, lambda b, h, n, j: (b, h // group_of, n, 0)),
            token_spec(time_major, None, chunk, value_block, lambda b, h, n, j: (b, h, n, j)),
            pl.BlockSpec((None, None, chunk), lambda b, h, n, j: (b, h, n)),
            pl.BlockSpec((None, None, None, key_dim, value_block), lambda b, h, n, j: (b, h, n, 0, j)),
            *runs_specs,
        ],
        out_specs=token_spec(time_major, None, chunk, value_block, lambda b, h, n, j: (b, h, n, j)),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        name="ssd_chunk_outputs",
        **launch_options(interpret, num_warps),
    )(q, k, v, cum, states, *runs_operands)
