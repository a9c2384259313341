"""Gated delta rule backward kernel: the gradients of every chunk, all chunks in parallel, time-major, T padded.

Chunk n (entering state ``S``, leaving-state cotangent ``dS'`` from ``kernel_bwd``, output cotangent ``dO``)
computes, with ``g`` the within-chunk inclusive cumulative log gates, ``γ = exp(g)``, ``Γ_ij = exp(g_i − g_j)``,
``X = (I + L)⁻¹``, ``L = strictlower(diag(β) (K Kᵀ ⊙ Γ))`` (``kernel_ut``, ``X`` stored by the forward) and the
pseudo-values ``U`` (stored by the forward):

    V' = V − (γ ⊙ K) S,    U = X diag(β) V',    A = (Q Kᵀ) ⊙ Γ (causal, diagonal included),
    O = (γ ⊙ Q) S + A U,    S' = γ_C S + (K ⊙ exp(g_C − g))ᵀ U.

Reverse mode through these (``K̃ = K ⊙ exp(g_C − g)``; ``rows``/``cols`` sum a ``[C, C]`` over its columns / rows):

    dU = Aᵀ dO + K̃ dS',    dY = Xᵀ dU,    dV = diag(β) dY,
    dA = (dO Uᵀ) ⊙ Γ (causal),    dL = −strictlower(dY Uᵀ)   (from dX = −Xᵀ dX' Xᵀ with X' = I + L),
    Z = dL ⊙ Γ (strictly lower),    Z_β = diag(β) Z,    G = K Kᵀ,
    dQ = dA K + γ ⊙ (dO Sᵀ),
    dK = dAᵀ Q − γ ⊙ (dV Sᵀ) + exp(g_C − g) ⊙ (U dS'ᵀ) + Z_β K + Z_βᵀ K,
    dβ = rows(dY ⊙ V') + rows(Z ⊙ G),
    dg = γ ⊙ rows(Q ⊙ dO Sᵀ) − γ ⊙ rows(K ⊙ dV Sᵀ) − rows(K̃ ⊙ U dS'ᵀ)
         + rows(dA ⊙ Q Kᵀ) − cols(dA ⊙ Q Kᵀ) + rows(Z_β ⊙ G) − cols(Z_β ⊙ G),
    dg_C += Σ_i (K̃ ⊙ U dS'ᵀ)_i + γ_C ⟨dS', S⟩,

and ``d log_a_i = Σ_{j ≥ i} dg_j`` within the chunk (``g`` is the inclusive cumulative sum of ``log_a``).
Every input of chunk n reaches the loss only through ``(O, S')``, so these are the whole sequence's gradients
(the entering states' own cotangents are ``kernel_bwd``'s).

``chunk_grads``: two kernels, each one program per (batch, head, chunk). The first (``_value_side_kernel``)
computes ``dY = Xᵀ dU`` and what depends on it ``value_block`` columns at a time (each block's ``dU``, ``dY``,
``V'`` live only for that block), stores ``dV`` and the float32 sums over the value dim: ``dY Uᵀ`` ``[C, C]``,
``−γ ⊙ dV Sᵀ`` ``[C, K]`` and per-row β and gate terms (the gate terms of the state products come from the
products the block computes anyway: ``γ_i k_i·(dV Sᵀ)_i = Σ_v dV_iv ((γ ⊙ K) S)_iv``,
``k̃_i·(U dS'ᵀ)_i = Σ_v U_iv (K̃ dS')_iv``). The second (``_key_side_kernel``) reads those sums back and forms
``dQ, dK, dβ, d log_a`` with the products that do not involve ``dY`` (``dO Uᵀ``, ``dO Sᵀ``, ``U dS'ᵀ``). One
kernel doing both kept too many float32 tiles live at once: on an H100 at 1 x 16K tokens, 16 heads of 128, it
took 6.6 ms, against 1.6 + 1.5 ms for the two halves alone (≈ 0.2 GB of float32 sums round-trip through
memory between them). Products with ``X``, ``dY`` and ``Z`` (the UT inverse's gradient) are float32
(``float32_dots``); the others take the inputs' dtype (bf16 tensor cores for bf16 inputs) with float32
accumulation.

Inputs: ``q, k [B, T, G, K]`` (head h reads group h // R), ``v``, ``pseudo`` (U), ``d_out`` ``[B, T, H, V]``,
``beta, cum [B, T, H]`` float32, ``inverse [B, T, H, C]`` float32, ``states`` and ``d_leaving`` ``[B, H, N, K, V]``.
Outputs per head: ``dq, dk [B, T, H, K]``, ``dv [B, T, H, V]``, ``dβ, d log_a [B, T, H]`` float32.

Packed sequences: the optional ``runs [B, T]`` int32 operand masks ``Γ`` (in ``A``, ``dA`` and ``Z``), ``γ``,
``exp(g_C − g)`` and ``γ_C`` as the forward does (``pallas_kernels.ssd.common``). The masks are constants, so the
formulas above hold unchanged with the masked factors; ``d log_a`` stays ``Σ_{j ≥ i} dg_j``: ``log_a`` of a
segment's first token only enters ``g`` of later tokens of the chunk, whose masked factors see ``g`` only through
differences within a segment (or ``g_C − g_j`` within the last one), so its terms cancel, as the recurrence's
zero gradient there requires. Without runs the kernels are the single-sequence ones.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gdn.float32_dots import float32_precision
from pallas_kernels.ssd.common import (carry_decay, causal_decay, chunk_runs, dot, dot_transposed_lhs,
                                       dot_transposed_rhs, last_row, launch_options, read_decay, runs_operand,
                                       write_decay)


def row_sums(x: jax.Array) -> jax.Array:
    """``Σ_j x_ij``: ``[C, M] -> [C]``."""
    return jnp.sum(x, axis=1)


def col_sums(x: jax.Array) -> jax.Array:
    """``Σ_i x_ij``: ``[C, C] -> [C]``."""
    return jnp.sum(x, axis=0)


def gate_factors(cum_ref, chunk: int, runs=None, run_last=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(g [C], γ = exp(g) [C], exp(g_C − g) [C])`` of one chunk (``γ``, ``exp(g_C − g)`` masked by the segment
    runs ``[C]``, ``[1]`` when given)."""
    cum = cum_ref[...]  # [C] float32
    return cum, read_decay(cum, runs), write_decay(cum, last_row(cum_ref, 0, chunk), runs, run_last)


def _value_block_sums(k_ref, v_ref, pseudo_ref, d_out_ref, beta_ref, cum_ref, inverse_ref, state_ref,
                      d_leaving_ref, dv_ref, attention, *, chunk: int, value_block: int, precision, runs=None,
                      run_last=None) -> dict:
    """Walk the value dim in blocks: store ``dV = diag(β) Xᵀ (Aᵀ dO + K̃ dS')`` and return the float32 sums over
    the value dim: ``d_coupling = dY Uᵀ`` ``[C, C]``; ``dk = −γ ⊙ dV Sᵀ`` ``[C, K]``; ``d_beta = rows(dY ⊙ V')``,
    ``d_gates = −rows(dV ⊙ (γ ⊙ K) S) − rows(U ⊙ K̃ dS')`` ``[C]``; ``written = Σ rows(U ⊙ K̃ dS')`` and
    ``overlap = ⟨dS', S⟩`` (scalars). ``runs``, ``run_last``: the chunk's segment runs (None: no segments)."""
    dtype = k_ref.dtype
    key_dim = k_ref.shape[1]
    sums = dict(d_coupling=jnp.zeros((chunk, chunk), jnp.float32), dk=jnp.zeros((chunk, key_dim), jnp.float32),
                d_beta=jnp.zeros((chunk,), jnp.float32), d_gates=jnp.zeros((chunk,), jnp.float32),
                written=jnp.zeros((), jnp.float32), overlap=jnp.zeros((), jnp.float32))
    for start in range(0, v_ref.shape[1], value_block):
        cols = pl.ds(start, value_block)
        _, from_start, to_end = gate_factors(cum_ref, chunk, runs, run_last)  # [C] each
        beta = beta_ref[...]  # [C]
        k32 = k_ref[...].astype(jnp.float32)  # [C, K]
        d_out, pseudo32 = d_out_ref[:, cols].astype(dtype), pseudo_ref[:, cols].astype(jnp.float32)  # dO, U [C, BV]
        state32, d_leaving32 = state_ref[:, cols].astype(jnp.float32), d_leaving_ref[:, cols].astype(jnp.float32)
        state, d_leaving = state32.astype(dtype), d_leaving32.astype(dtype)  # S, dS'  [K, BV]
        written = dot((k32 * to_end[:, None]).astype(dtype), d_leaving)  # K̃ dS'  [C, BV]
        kept = dot((k32 * from_start[:, None]).astype(dtype), state)  # (γ ⊙ K) S  [C, BV]
        d_pseudo = dot_transposed_lhs(attention, d_out) + written  # dU  [C, BV]
        d_solved = dot_transposed_lhs(inverse_ref[...], d_pseudo, precision)  # dY = Xᵀ dU  [C, BV]
        d_values = beta[:, None] * d_solved  # dV = dV'  [C, BV]
        dv_ref[:, cols] = d_values.astype(dv_ref.dtype)
        erased = v_ref[:, cols].astype(jnp.float32) - kept  # V'  [C, BV]
        written_rows = row_sums(pseudo32 * written)  # [C]
        sums["d_coupling"] += dot_transposed_rhs(d_solved, pseudo32, precision)
        sums["dk"] -= dot_transposed_rhs((from_start[:, None] * d_values).astype(dtype), state)
        sums["d_beta"] += row_sums(d_solved * erased)
        sums["d_gates"] -= row_sums(d_values * kept) + written_rows
        sums["written"] += jnp.sum(written_rows)
        sums["overlap"] += jnp.sum(row_sums(state32 * d_leaving32))
    return sums


def _value_side_kernel(q_ref, k_ref, v_ref, pseudo_ref, d_out_ref, beta_ref, cum_ref, inverse_ref, state_ref,
                       d_leaving_ref, *refs, chunk: int, value_block: int, precision):
    """One chunk of one head, first half: ``dV`` and the float32 sums over the value dim (``_value_block_sums``),
    with the chunk-end gate terms ``Σ rows(U ⊙ K̃ dS') + γ_C ⟨dS', S⟩`` folded into the gates' last row (decay
    factors masked by the segment runs when ``refs`` starts with a runs ref)."""
    *optional, dv_ref, d_coupling_ref, dk_ref, d_beta_ref, d_gates_ref = refs
    runs, run_last = chunk_runs(optional[0] if optional else None, 0, chunk)  # [C], [1] (None without segments)
    attention = (dot_transposed_rhs(q_ref[...], k_ref[...])
                 * causal_decay(cum_ref[...], runs)).astype(q_ref.dtype)  # A = (Q Kᵀ) ⊙ Γ  [C, C]
    sums = _value_block_sums(k_ref, v_ref, pseudo_ref, d_out_ref, beta_ref, cum_ref, inverse_ref, state_ref,
                             d_leaving_ref, dv_ref, attention, chunk=chunk, value_block=value_block,
                             precision=precision, runs=runs, run_last=run_last)
    d_coupling_ref[...] = sums["d_coupling"]
    dk_ref[...] = sums["dk"]
    d_beta_ref[...] = sums["d_beta"]
    is_last = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    chunk_decay = carry_decay(last_row(cum_ref, 0, chunk), run_last)  # γ_C  [1]
    d_gates_ref[...] = sums["d_gates"] + jnp.where(is_last, sums["written"] + chunk_decay * sums["overlap"], 0.0)


def _key_side_kernel(q_ref, k_ref, pseudo_ref, d_out_ref, beta_ref, cum_ref, state_ref, d_leaving_ref,
                     d_coupling_ref, dk_values_ref, d_beta_values_ref, d_gates_values_ref, *refs, chunk: int,
                     precision):
    """One chunk of one head, second half: ``dQ, dK, dβ, d log_a`` from the first half's sums (module docstring;
    decay factors masked by the segment runs when ``refs`` starts with a runs ref)."""
    *optional, dq_ref, dk_ref, d_beta_ref, d_log_a_ref = refs
    runs, run_last = chunk_runs(optional[0] if optional else None, 0, chunk)  # [C], [1] (None without segments)
    dtype = q_ref.dtype
    q, k = q_ref[...], k_ref[...]  # [C, K]
    k32 = k.astype(jnp.float32)
    beta = beta_ref[...]  # [C]
    _, from_start, to_end = gate_factors(cum_ref, chunk, runs, run_last)  # [C] each
    d_out, pseudo = d_out_ref[...].astype(dtype), pseudo_ref[...].astype(dtype)  # dO, U  [C, V]
    state, d_leaving = state_ref[...].astype(dtype), d_leaving_ref[...].astype(dtype)  # S, dS'  [K, V]
    decay = causal_decay(cum_ref[...], runs)  # Γ, causal  [C, C]
    scores = dot_transposed_rhs(q, k)  # Q Kᵀ  [C, C]
    gram = dot_transposed_rhs(k, k)  # G  [C, C]
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    d_attention = dot_transposed_rhs(d_out, pseudo) * decay  # dA = (dO Uᵀ) ⊙ Γ  [C, C]
    d_coupling = jnp.where(rows > cols, -d_coupling_ref[...] * decay, 0.0)  # Z  [C, C]
    d_gram = beta[:, None] * d_coupling  # Z_β  [C, C]

    dq_state = from_start[:, None] * dot_transposed_rhs(d_out, state)  # γ ⊙ dO Sᵀ  [C, K]
    dq = dot(d_attention.astype(dtype), k) + dq_state  # [C, K]
    dk = (dot_transposed_lhs(d_attention.astype(dtype), q) + dk_values_ref[...]
          + to_end[:, None] * dot_transposed_rhs(pseudo, d_leaving)
          + dot(d_gram + d_gram.T, k32, precision))  # [C, K]
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    d_beta_ref[...] = d_beta_values_ref[...] + row_sums(d_coupling * gram)

    pair_gates = d_attention * scores + d_gram * gram  # dA ⊙ Q Kᵀ + Z_β ⊙ G  [C, C]
    d_gates = (row_sums(q.astype(jnp.float32) * dq_state) + d_gates_values_ref[...]
               + row_sums(pair_gates) - col_sums(pair_gates))  # dg  [C]
    d_log_a_ref[...] = row_sums(jnp.where(cols >= rows, d_gates[None, :], 0.0))  # Σ_{j ≥ i} dg_j


class ChunkSpecs(NamedTuple):
    """Per-(batch, head, chunk) BlockSpecs of the time-major ``[B, T, X, D]`` operands, grid ``(b, h, n)``."""

    group_rows: pl.BlockSpec  # [C, K] rows of the head's q/k group
    head_keys: pl.BlockSpec  # [C, K] rows of the head
    head_values: pl.BlockSpec  # [C, V] rows of the head
    head_gates: pl.BlockSpec  # [C] of a [B, T, H] array
    head_square: pl.BlockSpec  # [C, C] of a [B, T, H, C] array (one row per token)


def chunk_specs(chunk: int, key_dim: int, value_dim: int, heads_per_group: int) -> ChunkSpecs:
    """The ``ChunkSpecs`` of one chunk of one head (head h reads q/k group ``h // heads_per_group``)."""
    return ChunkSpecs(
        group_rows=pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n: (b, n, h // heads_per_group, 0)),
        head_keys=pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n: (b, n, h, 0)),
        head_values=pl.BlockSpec((None, chunk, None, value_dim), lambda b, h, n: (b, n, h, 0)),
        head_gates=pl.BlockSpec((None, chunk, None), lambda b, h, n: (b, n, h)),
        head_square=pl.BlockSpec((None, chunk, None, chunk), lambda b, h, n: (b, n, h, 0)))


def chunk_grads(q: jax.Array, k: jax.Array, v: jax.Array, pseudo: jax.Array, d_out: jax.Array, beta: jax.Array,
                cum: jax.Array, inverse: jax.Array, states: jax.Array, d_leaving: jax.Array, *, chunk: int,
                value_block: int, float32_dots: str = "ieee", num_warps: int | None = None,
                interpret=None, runs: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """Per-head ``(dq, dk [B, T, H, K], dv [B, T, H, V], dβ, d log_a [B, T, H])`` (module docstring); ``dq, dk``
    in q's dtype when every group has one head, else float32 (the caller sums them over each group's heads);
    ``dv`` in v's dtype; ``dβ, d log_a`` float32. ``float32_dots``: precision of the float32 products
    (``float32_dots.FLOAT32_DOTS``). ``runs [B, T]`` int32: the segment runs of packed sequences, None for one
    sequence per row."""
    batch, length, groups, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    group_of = heads // groups
    key_dtype = q.dtype if group_of == 1 else jnp.float32
    precision = float32_precision(float32_dots, interpret)
    group_rows, head_keys, head_values, head_gates, head_square = chunk_specs(chunk, key_dim, value_dim, group_of)
    head_states = pl.BlockSpec((None, None, None, key_dim, value_dim), lambda b, h, n: (b, h, n, 0, 0))
    gates_shape = jax.ShapeDtypeStruct((batch, length, heads), jnp.float32)
    grid = (batch, heads, length // chunk)
    runs_specs, runs_operands = runs_operand(runs, chunk, lambda b, h, n: (b, n))
    dv, d_coupling, dk_values, d_beta_values, d_gates_values = pl.pallas_call(
        functools.partial(_value_side_kernel, chunk=chunk, value_block=value_block, precision=precision),
        grid=grid,
        in_specs=[group_rows, group_rows, head_values, head_values, head_values, head_gates, head_gates,
                  head_square, head_states, head_states, *runs_specs],
        out_specs=[head_values, head_square, head_keys, head_gates, head_gates],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((batch, length, heads, chunk), jnp.float32),
                   jax.ShapeDtypeStruct((batch, length, heads, key_dim), jnp.float32), gates_shape, gates_shape],
        name="gdn_chunk_grads_values",
        **launch_options(interpret, num_warps),
    )(q, k, v, pseudo, d_out, beta, cum, inverse, states, d_leaving,
      *runs_operands)  # dV, dY Uᵀ, −γ ⊙ dV Sᵀ, β / gate terms
    dq, dk, d_beta, d_log_a = pl.pallas_call(
        functools.partial(_key_side_kernel, chunk=chunk, precision=precision),
        grid=grid,
        in_specs=[group_rows, group_rows, head_values, head_values, head_gates, head_gates, head_states,
                  head_states, head_square, head_keys, head_gates, head_gates, *runs_specs],
        out_specs=[head_keys, head_keys, head_gates, head_gates],
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, key_dim), key_dtype),
                   jax.ShapeDtypeStruct((batch, length, heads, key_dim), key_dtype), gates_shape, gates_shape],
        name="gdn_chunk_grads_keys",
        **launch_options(interpret, num_warps),
    )(q, k, pseudo, d_out, beta, cum, states, d_leaving, d_coupling, dk_values, d_beta_values, d_gates_values,
      *runs_operands)
    return dq, dk, dv, d_beta, d_log_a
