"""Gated delta rule backward kernel: the reverse pass of the state cotangents, time-major, T padded to chunks.

Chunk n maps its entering state ``S_n`` to ``O_n = (Q ⊙ γ) S_n + A U`` and ``S_{n+1} = γ_C S_n + K̃ᵀ U`` with
``U = U₀ − W S_n``, ``A = (Q Kᵀ) ⊙ Γ`` (causal, diagonal included) and ``K̃ = K ⊙ exp(g_C − g)``. So the
total cotangent of ``S_n`` is

    dU = Aᵀ dO_n + K̃ dS_{n+1},    dS_n = γ_C dS_{n+1} + (Q ⊙ γ)ᵀ dO_n − Wᵀ dU.

``state_cotangents``: one program per (batch, head, value block) walks the chunks backwards from
``dS_N`` (the final state's cotangent), keeping its ``K × value_block`` cotangent in float32 on chip; it
stores ``dS_{n+1}`` for every chunk n in ``cotangent_dtype`` (the per-chunk gradients of ``kernel_chunk_bwd``
read these as matmul operands) and writes ``dS_0``, the initial state's cotangent, in float32.

Inputs: ``q, k [B, T, G, K]`` (head h reads group h // R), ``cum [B, T, H]`` float32, ``w`` and
``decayed_keys`` ``[B, T, H, K]`` (from ``kernel_ut``), ``d_out [B, T, H, V]``, ``d_final [B, H, K, V]``.
Packed sequences: the optional ``runs [B, T]`` int32 operand masks ``Γ`` in ``A``, ``γ`` in ``Q ⊙ γ`` and the
carry ``γ_C`` as the forward does (``kernel_fwd``; ``W`` and ``K̃`` come masked from ``kernel_ut``), so this is
the reverse pass of the delta rule with resets; without runs the kernel is the single-sequence one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ssd.common import (carry_decay, causal_decay, chunk_runs, dot, dot_transposed_lhs,
                                       dot_transposed_rhs, last_row, launch_options, read_decay, runs_operand)


def _state_cotangents_kernel(q_ref, k_ref, cum_ref, w_ref, decayed_ref, d_out_ref, d_final_ref, *refs, chunk: int,
                             num_chunks: int):
    """Backwards over chunks: store ``dS_{n+1}``, then ``dS_n = γ_C dS_{n+1} + (Q ⊙ γ)ᵀ dO − Wᵀ dU`` (the decay
    factors masked by the segment runs when ``refs`` starts with a runs ref)."""
    *optional, d_leaving_ref, d_initial_ref = refs
    runs_ref = optional[0] if optional else None

    def step(i, d_state):  # dS_{n+1} [K, BV] float32
        n = num_chunks - 1 - i
        d_leaving_ref[n] = d_state.astype(d_leaving_ref.dtype)
        rows = pl.ds(n * chunk, chunk)
        q, k, w = q_ref[rows, :], k_ref[rows, :], w_ref[rows, :]  # [C, K]
        decayed_keys = decayed_ref[rows, :]  # K̃  [C, K]
        d_out = d_out_ref[rows, :]  # [C, BV]
        cum = cum_ref[rows]  # [C]
        cum_last = last_row(cum_ref, n * chunk, chunk)  # g_C  [1]
        runs, run_last = chunk_runs(runs_ref, n * chunk, chunk)  # [C], [1] (None without segments)
        scores = causal_decay(cum, runs) * dot_transposed_rhs(q, k)  # A  [C, C] float32
        d_pseudo = (dot_transposed_lhs(scores.astype(d_out.dtype), d_out)
                    + dot(decayed_keys, d_state.astype(decayed_keys.dtype)))  # dU  [C, BV]
        q_from_start = (q.astype(jnp.float32) * read_decay(cum, runs)[:, None]).astype(d_out.dtype)  # Q ⊙ γ
        return (carry_decay(cum_last, run_last)[:, None] * d_state + dot_transposed_lhs(q_from_start, d_out)
                - dot_transposed_lhs(w, d_pseudo.astype(w.dtype)))

    d_initial_ref[...] = jax.lax.fori_loop(0, num_chunks, step, d_final_ref[...].astype(jnp.float32))


def state_cotangents(q: jax.Array, k: jax.Array, cum: jax.Array, w: jax.Array, decayed_keys: jax.Array,
                     d_out: jax.Array, d_final: jax.Array, *, chunk: int, value_block: int,
                     num_warps: int | None = None, num_stages: int | None = None, cotangent_dtype=jnp.float32,
                     interpret=None, runs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(cotangents of the states leaving every chunk ``[B, H, N, K, V]`` in ``cotangent_dtype``, initial state's
    cotangent ``[B, H, K, V]`` float32). ``runs [B, T]`` int32: the segment runs of packed sequences, None for one
    sequence per row."""
    batch, length, groups, key_dim = q.shape
    heads, value_dim = d_out.shape[2], d_out.shape[3]
    group_of = heads // groups
    num_chunks = length // chunk
    kernel = functools.partial(_state_cotangents_kernel, chunk=chunk, num_chunks=num_chunks)
    runs_specs, runs_operands = runs_operand(runs, length, lambda b, h, j: (b, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, value_dim // value_block),
        in_specs=[
            pl.BlockSpec((None, length, None, key_dim), lambda b, h, j: (b, 0, h // group_of, 0)),
            pl.BlockSpec((None, length, None, key_dim), lambda b, h, j: (b, 0, h // group_of, 0)),
            pl.BlockSpec((None, length, None), lambda b, h, j: (b, 0, h)),
            pl.BlockSpec((None, length, None, key_dim), lambda b, h, j: (b, 0, h, 0)),
            pl.BlockSpec((None, length, None, key_dim), lambda b, h, j: (b, 0, h, 0)),
            pl.BlockSpec((None, length, None, value_block), lambda b, h, j: (b, 0, h, j)),
            pl.BlockSpec((None, None, key_dim, value_block), lambda b, h, j: (b, h, 0, j)),
            *runs_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_chunks, key_dim, value_block), lambda b, h, j: (b, h, 0, 0, j)),
            pl.BlockSpec((None, None, key_dim, value_block), lambda b, h, j: (b, h, 0, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), cotangent_dtype),
                   jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        name="gdn_state_cotangents",
        **launch_options(interpret, num_warps, num_stages),
    )(q, k, cum, w, decayed_keys, d_out, d_final, *runs_operands)
