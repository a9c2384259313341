"""Gated delta rule forward kernels after the UT transform (``kernel_ut``), time-major, T padded to chunks.

With ``W``, ``U₀`` of every chunk (``kernel_ut``), ``g`` the within-chunk cumulative log gates and the
state ``S_n [K, V]`` entering chunk ``n`` (Yang, Kautz, Hatamizadeh 2025, §3.2):

1. ``chunk_states``: one program per (batch, head, value block) walks the chunks in order, keeping its
   ``K × value_block`` state in float32 on chip; per chunk it stores ``S_n``, the pseudo-values
   ``U = U₀ − W S_n`` and steps ``S_{n+1} = γ_C S_n + (K ⊙ exp(g_C − g))ᵀ U``; it also writes the final state.
2. ``chunk_outputs``: one program per (batch, head, chunk, value block), all in parallel:
   ``O = ((Q Kᵀ) ⊙ Γ) U + exp(g) ⊙ (Q S_n)`` with ``Γ_ij = exp(g_i − g_j)`` for ``j ≤ i``: the SSD chunk-output
   kernel body with the pseudo-values in place of the values.

Inputs: ``q, k [B, T, G, K]`` (head h reads group h // R), ``w``, ``decayed_keys = K ⊙ exp(g_C − g)``
``[B, T, H, K]``, ``u0 [B, T, H, V]``, ``cum [B, T, H]`` float32, ``initial [B, H, K, V]`` float32.

Packed sequences: the optional ``runs [B, T]`` int32 operand (``pallas_kernels.ssd.common``) masks the carry
``γ_C × [no start in the chunk]``, the pairs ``Γ_ij × [same run]`` and the state read ``γ_i × [runs_i = 0]``;
``W`` and ``K̃`` come masked from ``kernel_ut``. A segment starting at token t is the recurrence with ``a_t = 0``,
and these masked factors are exactly that limit, so the outputs are the delta rule with resets. Without runs
the kernels are the single-sequence ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ssd.common import (carry_decay, chunk_runs, dot, dot_transposed_lhs, last_row, launch_options,
                                       runs_operand)
from pallas_kernels.ssd.kernel_fwd import chunk_outputs_kernel, segmented_chunk_outputs_kernel


def _chunk_states_kernel(w_ref, u0_ref, decayed_ref, cum_ref, initial_ref, *refs, chunk: int, num_chunks: int):
    """Sequential over chunks: store ``S``, ``U = U₀ − W S``, then ``S ← γ_C S + (K ⊙ exp(g_C − g))ᵀ U`` (the
    carry ``γ_C`` masked by the segment runs when ``refs`` starts with a runs ref)."""
    *optional, states_ref, pseudo_ref, final_ref = refs
    runs_ref = optional[0] if optional else None

    def step(n, state):  # state [K, BV] float32
        states_ref[n] = state.astype(states_ref.dtype)
        rows = pl.ds(n * chunk, chunk)
        w = w_ref[rows, :]  # [C, K]
        decayed_keys = decayed_ref[rows, :]  # K ⊙ exp(g_C − g)  [C, K]
        cum_last = last_row(cum_ref, n * chunk, chunk)  # g_C  [1]
        _, run_last = chunk_runs(runs_ref, n * chunk, chunk)  # [1] (None without segments)
        pseudo = u0_ref[rows, :].astype(jnp.float32) - dot(w, state.astype(w.dtype))  # U  [C, BV]
        pseudo = pseudo.astype(pseudo_ref.dtype)
        pseudo_ref[rows, :] = pseudo
        carry = carry_decay(cum_last, run_last)  # γ_C (× [no start in the chunk])  [1]
        return carry[:, None] * state + dot_transposed_lhs(decayed_keys.astype(pseudo.dtype), pseudo)

    final_ref[...] = jax.lax.fori_loop(0, num_chunks, step, initial_ref[...].astype(jnp.float32))


def transition_specs(length: int, key_dim: int, value_block: int) -> list[pl.BlockSpec]:
    """BlockSpecs of a sequential pass over the chunks, grid ``(b, h, value block j)``: the whole row of one head
    of ``W``, of the value block ``j`` of ``U₀``, of ``K̃`` and of the gates ``g`` (time-major ``[B, T, H, ...]``)."""
    keys = pl.BlockSpec((None, length, None, key_dim), lambda b, h, j: (b, 0, h, 0))
    return [keys, pl.BlockSpec((None, length, None, value_block), lambda b, h, j: (b, 0, h, j)), keys,
            pl.BlockSpec((None, length, None), lambda b, h, j: (b, 0, h))]


def chunk_states(w: jax.Array, u0: jax.Array, decayed_keys: jax.Array, cum: jax.Array, initial: jax.Array, *,
                 chunk: int, value_block: int, state_dtype, num_warps: int | None = None,
                 num_stages: int | None = None, interpret=None,
                 runs: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(entering states ``[B, H, N, K, V]`` in ``state_dtype``, pseudo-values ``U [B, T, H, V]`` in u0's dtype,
    final state ``[B, H, K, V]`` float32). ``runs [B, T]`` int32: the segment runs of packed sequences, None for
    one sequence per row."""
    batch, length, heads, key_dim = w.shape
    value_dim = u0.shape[3]
    num_chunks = length // chunk
    kernel = functools.partial(_chunk_states_kernel, chunk=chunk, num_chunks=num_chunks)
    runs_specs, runs_operands = runs_operand(runs, length, lambda b, h, j: (b, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, value_dim // value_block),
        in_specs=[
            *transition_specs(length, key_dim, value_block),
            pl.BlockSpec((None, None, key_dim, value_block), lambda b, h, j: (b, h, 0, j)),
            *runs_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_chunks, key_dim, value_block), lambda b, h, j: (b, h, 0, 0, j)),
            pl.BlockSpec((None, length, None, value_block), lambda b, h, j: (b, 0, h, j)),
            pl.BlockSpec((None, None, key_dim, value_block), lambda b, h, j: (b, h, 0, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), state_dtype),
                   jax.ShapeDtypeStruct(u0.shape, u0.dtype),
                   jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        name="gdn_chunk_states",
        **launch_options(interpret, num_warps, num_stages),
    )(w, u0, decayed_keys, cum, initial, *runs_operands)


def chunk_outputs(q: jax.Array, k: jax.Array, pseudo: jax.Array, cum: jax.Array, states: jax.Array, *, chunk: int,
                  value_block: int, num_warps: int | None = None, interpret=None,
                  runs: jax.Array | None = None) -> jax.Array:
    """Outputs ``[B, T, H, V]`` in the pseudo-values' dtype from the entering states of ``chunk_states``
    (``runs`` as there)."""
    batch, length, groups, key_dim = q.shape
    heads, value_dim = pseudo.shape[2], pseudo.shape[3]
    group_of = heads // groups
    runs_specs, runs_operands = runs_operand(runs, chunk, lambda b, h, n, j: (b, n))
    return pl.pallas_call(
        chunk_outputs_kernel if runs is None else segmented_chunk_outputs_kernel,
        grid=(batch, heads, length // chunk, value_dim // value_block),
        in_specs=[
            pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n, j: (b, n, h // group_of, 0)),
            pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n, j: (b, n, h // group_of, 0)),
            pl.BlockSpec((None, chunk, None, value_block), lambda b, h, n, j: (b, n, h, j)),
            pl.BlockSpec((None, chunk, None), lambda b, h, n, j: (b, n, h)),
            pl.BlockSpec((None, None, None, key_dim, value_block), lambda b, h, n, j: (b, h, n, 0, j)),
            *runs_specs,
        ],
        out_specs=pl.BlockSpec((None, chunk, None, value_block), lambda b, h, n, j: (b, n, h, j)),
        out_shape=jax.ShapeDtypeStruct(pseudo.shape, pseudo.dtype),
        name="gdn_chunk_outputs",
        **launch_options(interpret, num_warps, None),
    )(q, k, pseudo, cum, states, *runs_operands)
