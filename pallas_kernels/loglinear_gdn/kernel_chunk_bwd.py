"""Log-linear Gated DeltaNet backward kernel: the per-chunk gradients, all chunks in parallel, time-major, T padded.

The level-free per-chunk map of ``backward.chunk_map`` (``g`` the within-chunk inclusive cumulative log gates,
``γ = exp(g)``, ``e = exp(g_C − g)``, ``Γ_ij = exp(g_i − g_j)`` for ``j ≤ i``, ``𝒯 = (I + L)⁻¹`` with
``L = strictlower(diag(β) (K Kᵀ ⊙ Γ))`` stored by the forward's UT transform, ``B = 𝒯 diag(β)``)::

    A = (Q Kᵀ) ⊙ Γ,   W = B (γ ⊙ K),   U₀ = B V,   K̃ = e ⊙ K,
    O_loc = ((A B) ⊙ Λ) V,   Q̂ = γ ⊙ Q − A W,   M = γ_C I − K̃ᵀ W,   X = K̃ᵀ U₀,

pulled back from the cotangents ``dO``, ``dQ̂`` (``kernel_bwd.level_read_grads``), ``P`` (of ``M``) and ``dX``
(``kernel_bwd.level_cotangents``)::

    D = (dO Vᵀ) ⊙ Λ  (of A B),   dU₀ = K̃ dX,   dW = −Aᵀ dQ̂ − K̃ P,   dK̃ = −W Pᵀ + B (V dXᵀ),
    dB = Aᵀ D + dU₀ Vᵀ + dW (γ ⊙ K)ᵀ,   dL = −strictlower(𝒯ᵀ dB Bᵀ)  (from d(I + L)⁻¹ = −𝒯 dL 𝒯),
    Z = dL ⊙ Γ,   Z_β = diag(β) Z,   G = K Kᵀ,   dA = D Bᵀ − dQ̂ Wᵀ,   dS = dA ⊙ Γ,
    dQ = dS K + γ ⊙ dQ̂,
    dK = dSᵀ Q + γ ⊙ (Bᵀ dW) + e ⊙ dK̃ + (Z_β + Z_βᵀ) K,
    dV = ((A B) ⊙ Λ)ᵀ dO + Bᵀ dU₀,
    dβ = cols(dB ⊙ 𝒯) + rows(Z ⊙ G),
    dλ_t^{(ℓ)} = Σ_{s: level(t, s) = ℓ} (dO Vᵀ ⊙ A B)_ts   (the in-chunk levels ℓ ≤ log2 C),
    dg = γ ⊙ rows(Q ⊙ dQ̂) + γ ⊙ rows(K ⊙ Bᵀ dW) − e ⊙ rows(K ⊙ dK̃)
         + rows(dS ⊙ Q Kᵀ) − cols(dS ⊙ Q Kᵀ) + rows(Z_β ⊙ G) − cols(Z_β ⊙ G),
    dg_C += γ_C tr P + Σ_i e_i rows(K ⊙ dK̃)_i,

(``rows`` / ``cols``: sums over a matrix's columns / rows) and ``d log_a_i = Σ_{j ≥ i} dg_j`` within the chunk.
Products with ``𝒯``, ``B``, ``dB``, ``dW`` and ``P`` are float32 (``float32_dots`` precision); the products of
the inputs (``Q Kᵀ``, ``K Kᵀ``, ``dO Vᵀ``, ``K̃ dX``, ``V dXᵀ``, ``((A B) ⊙ Λ)ᵀ dO``, ``dS K``, ``dSᵀ Q``) take the
inputs' dtype (bf16 tensor cores for bf16 inputs) with float32 accumulation.

``chunk_grads``: four kernels, each one program per (batch, head, chunk), so that no program holds too many
float32 tiles (one kernel with everything asked an H100 for 256–336 KiB of shared memory at K = V = 128, over the
227 KiB it has; with ``dB``'s producer and consumer in one kernel that kernel alone took 6.6 ms at 1 x 16K x 16
heads). ``_transition_side_kernel`` contracts the two large cotangents ``P [K, K]`` and ``dX [K, V]``:
``dU₀ = K̃ dX``, ``−K̃ P``, ``−W Pᵀ``, ``V dXᵀ`` (``[C, V|K]`` float32) and ``γ_C tr P``. ``_value_side_kernel``
writes ``dV`` and the in-chunk ``dλ`` and stores ``dW``, ``dB``; ``_coupling_side_kernel`` forms ``dL``, ``Z_β``,
``dβ``, ``dK̃`` and the parts of ``dK`` and ``dg`` that do not involve ``dS``; ``_score_side_kernel`` adds
``dS``'s and writes ``dQ``, ``dK``, ``d log_a``.

Inputs: ``q, k [B, T', G, K]`` (head h reads group h // R), ``v``, ``d_out`` ``[B, T', H, V]``,
``w [B, T', H, K]``, ``inverse [B, T', H, C]`` float32, ``beta, cum [B, T', H]`` float32, ``lam_rows [B, H, R, T']``,
``d_queries [B, T', H, K]`` float32, ``d_transitions [B, H, N, K, K]`` float32, ``d_writes [B, H, N, K, V]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gdn.float32_dots import float32_precision
from pallas_kernels.gdn.kernel_chunk_bwd import chunk_specs, col_sums, gate_factors, row_sums
from pallas_kernels.loglinear.kernel_fwd import in_chunk_level_masks, in_chunk_level_weights
from pallas_kernels.ssd.common import (causal_decay, dot, dot_transposed_lhs, dot_transposed_rhs, last_row,
                                       launch_options)
from pallas_kernels.triangular import identity_matrix, strictly_lower_mask


def _last_row_only(value: jax.Array, chunk: int) -> jax.Array:
    """``[C]``: ``value`` (a scalar) in the chunk's last row, 0 elsewhere."""
    return jnp.where(jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1, value, 0.0)


def _transition_side_kernel(k_ref, v_ref, w_ref, cum_ref, d_transitions_ref, d_writes_ref, d_values_solved_ref,
                            d_w_ref, d_decayed_ref, values_writes_ref, d_gates_ref, *, precision):
    """``dU₀ = K̃ dX``, ``−K̃ P`` (of ``dW``), ``−W Pᵀ`` (of ``dK̃``), ``V dXᵀ`` and ``γ_C tr P`` (last row)."""
    k, v = k_ref[...], v_ref[...]  # [C, K], [C, V]
    chunk = k.shape[0]
    _, _, to_end = gate_factors(cum_ref, chunk)  # e  [C]
    decayed_keys = (k.astype(jnp.float32) * to_end[:, None]).astype(k.dtype)  # K̃  [C, K]
    d_transition = d_transitions_ref[...]  # P  [K, K] float32
    d_writes = d_writes_ref[...].astype(k.dtype)  # dX  [K, V]
    d_values_solved_ref[...] = dot(decayed_keys, d_writes)  # dU₀  [C, V]
    d_w_ref[...] = -dot(decayed_keys.astype(jnp.float32), d_transition, precision)  # −K̃ P  [C, K]
    d_decayed_ref[...] = -dot_transposed_rhs(w_ref[...].astype(jnp.float32), d_transition, precision)  # −W Pᵀ
    values_writes_ref[...] = dot_transposed_rhs(v, d_writes.astype(v.dtype))  # V dXᵀ  [C, K]
    trace = jnp.sum(jnp.where(identity_matrix(d_transition.shape[0]) > 0, d_transition, 0.0))  # tr P
    d_gates_ref[...] = _last_row_only(jnp.exp(last_row(cum_ref, 0, chunk)) * trace, chunk)


def _value_side_kernel(q_ref, k_ref, v_ref, d_out_ref, inverse_ref, beta_ref, cum_ref, lam_ref, d_queries_ref,
                       d_values_solved_ref, d_w_transition_ref, dv_ref, d_lam_ref, d_solved_ref, d_w_ref, *,
                       in_chunk_levels: int, precision):
    """``dV``, the in-chunk ``dλ``, and (stored for ``_coupling_side_kernel``) ``dW`` and ``dB``."""
    q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], d_out_ref[...].astype(v_ref.dtype)  # [C, K|V]
    dtype = q.dtype
    chunk = q.shape[0]
    cum, from_start, _ = gate_factors(cum_ref, chunk)  # g, γ  [C]
    solved = inverse_ref[...] * beta_ref[...][None, :]  # B = 𝒯 diag(β)  [C, C]
    attention = dot_transposed_rhs(q, k) * causal_decay(cum)  # A  [C, C]
    pairs = dot(attention, solved, precision)  # A B  [C, C]
    masks = in_chunk_level_masks(chunk, in_chunk_levels)
    level_weights = in_chunk_level_weights(masks, [lam_ref[level] for level in range(in_chunk_levels)])  # Λ
    d_out_values = dot_transposed_rhs(d_out, v)  # dO Vᵀ  [C, C]
    for row in range(lam_ref.shape[0]):
        d_lam_ref[row] = (row_sums(jnp.where(masks[row], d_out_values * pairs, 0.0)) if row < in_chunk_levels
                          else jnp.zeros((chunk,), jnp.float32))
    d_values_solved = d_values_solved_ref[...]  # dU₀  [C, V] float32
    dv = (dot_transposed_lhs((pairs * level_weights).astype(dtype), d_out)
          + dot_transposed_lhs(solved, d_values_solved, precision))  # [C, V]
    dv_ref[...] = dv.astype(dv_ref.dtype)
    d_w = d_w_transition_ref[...] - dot_transposed_lhs(attention, d_queries_ref[...], precision)  # dW  [C, K]
    d_w_ref[...] = d_w
    d_solved_ref[...] = (dot_transposed_lhs(attention, d_out_values * level_weights, precision)
                         + dot_transposed_rhs(d_values_solved.astype(dtype), v)
                         + dot_transposed_rhs(d_w, k.astype(jnp.float32) * from_start[:, None], precision))  # dB


def _coupling_side_kernel(k_ref, inverse_ref, beta_ref, cum_ref, d_solved_ref, d_w_ref, d_decayed_ref,
                          values_writes_ref, d_gates_in_ref, d_beta_ref, dk_ref, d_gates_ref, *, precision):
    """``dL``, ``Z_β``, ``dβ``, ``dK̃``; ``dK`` and ``dg`` but their ``dS`` and ``Q`` terms."""
    k = k_ref[...]  # [C, K]
    k32 = k.astype(jnp.float32)
    chunk = k.shape[0]
    cum, from_start, to_end = gate_factors(cum_ref, chunk)  # g, γ, e  [C]
    beta = beta_ref[...]  # [C]
    inverse = inverse_ref[...]  # 𝒯  [C, C] float32
    solved = inverse * beta[None, :]  # B  [C, C]
    decay = causal_decay(cum)  # Γ  [C, C]
    d_solved = d_solved_ref[...]  # dB  [C, C]
    back = dot_transposed_lhs(solved, d_w_ref[...], precision)  # Bᵀ dW  [C, K]
    d_coupling = -jnp.where(strictly_lower_mask(chunk),
                            dot_transposed_rhs(dot_transposed_lhs(inverse, d_solved, precision), solved, precision),
                            0.0)  # dL  [C, C]
    gram = dot_transposed_rhs(k, k)  # G  [C, C]
    coupling_gates = beta[:, None] * d_coupling * decay  # Z_β  [C, C]
    d_beta_ref[...] = col_sums(d_solved * inverse) + row_sums(d_coupling * decay * gram)
    d_decayed_keys = d_decayed_ref[...] + dot(solved, values_writes_ref[...], precision)  # dK̃  [C, K]
    dk_ref[...] = (from_start[:, None] * back + to_end[:, None] * d_decayed_keys
                   + dot(coupling_gates + coupling_gates.T, k32, precision))  # dK but dSᵀ Q  [C, K]
    written = to_end * row_sums(k32 * d_decayed_keys)  # e ⊙ rows(K ⊙ dK̃)  [C]
    coupling_pairs = coupling_gates * gram  # Z_β ⊙ G  [C, C]
    d_gates_ref[...] = (d_gates_in_ref[...] + from_start * row_sums(k32 * back) - written
                        + row_sums(coupling_pairs) - col_sums(coupling_pairs)
                        + _last_row_only(jnp.sum(written), chunk))  # dg but its Q and dS terms  [C]


def _score_side_kernel(q_ref, k_ref, v_ref, d_out_ref, w_ref, inverse_ref, beta_ref, cum_ref, lam_ref,
                       d_queries_ref, dk_partial_ref, d_gates_partial_ref, dq_ref, dk_ref, d_log_a_ref, *,
                       in_chunk_levels: int, precision):
    """``dA = D Bᵀ − dQ̂ Wᵀ``, ``dS = dA ⊙ Γ``: ``dQ``, ``dK``, ``d log_a`` (the chunk's reverse cumulative ``dg``)."""
    q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], d_out_ref[...].astype(v_ref.dtype)  # [C, K|V]
    dtype = q.dtype
    chunk = q.shape[0]
    cum, from_start, _ = gate_factors(cum_ref, chunk)  # g, γ  [C]
    solved = inverse_ref[...] * beta_ref[...][None, :]  # B  [C, C]
    decay = causal_decay(cum)  # Γ  [C, C]
    masks = in_chunk_level_masks(chunk, in_chunk_levels)
    level_weights = in_chunk_level_weights(masks, [lam_ref[level] for level in range(in_chunk_levels)])  # Λ
    d_pairs = dot_transposed_rhs(d_out, v) * level_weights  # D  [C, C]
    d_queries = d_queries_ref[...]  # dQ̂  [C, K]
    d_attention = (dot_transposed_rhs(d_pairs, solved, precision)
                   - dot_transposed_rhs(d_queries, w_ref[...].astype(jnp.float32), precision))  # dA  [C, C]
    d_scores = d_attention * decay  # dS  [C, C]
    dq_ref[...] = (dot(d_scores.astype(dtype), k) + from_start[:, None] * d_queries).astype(dq_ref.dtype)
    dk_ref[...] = (dot_transposed_lhs(d_scores.astype(dtype), q) + dk_partial_ref[...]).astype(dk_ref.dtype)
    score_pairs = d_scores * dot_transposed_rhs(q, k)  # dS ⊙ Q Kᵀ  [C, C]
    d_gates = (d_gates_partial_ref[...] + from_start * row_sums(q.astype(jnp.float32) * d_queries)
               + row_sums(score_pairs) - col_sums(score_pairs))  # dg  [C]
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    d_log_a_ref[...] = row_sums(jnp.where(cols >= rows, d_gates[None, :], 0.0))  # Σ_{j ≥ i} dg_j


def chunk_grads(q: jax.Array, k: jax.Array, v: jax.Array, d_out: jax.Array, w: jax.Array, inverse: jax.Array,
                beta: jax.Array, cum: jax.Array, lam_rows: jax.Array, d_queries: jax.Array,
                d_transitions: jax.Array, d_writes: jax.Array, *, chunk: int, in_chunk_levels: int,
                float32_dots: str = "ieee", num_warps: int | None = None,
                interpret=None) -> tuple[jax.Array, ...]:
    """Per-head ``(dq, dk [B, T', H, K], dv [B, T', H, V], dβ, d log_a [B, T', H], dλ rows [B, H, R, T'])``
    (module docstring): ``dq, dk`` in q's dtype when every group has one head, else float32 (the caller sums them
    over each group's heads); ``dv`` in v's dtype; the rest float32, ``dλ`` only in the in-chunk levels' rows."""
    batch, length, groups, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    group_of = heads // groups
    key_dtype = q.dtype if group_of == 1 else jnp.float32
    precision = float32_precision(float32_dots, interpret)
    group_rows, head_keys, head_values, head_gates, head_square = chunk_specs(chunk, key_dim, value_dim, group_of)
    lam_spec = pl.BlockSpec((None, None, lam_rows.shape[2], chunk), lambda b, h, n: (b, h, 0, n))
    gates_shape = jax.ShapeDtypeStruct(beta.shape, jnp.float32)
    keys_shape = jax.ShapeDtypeStruct((batch, length, heads, key_dim), jnp.float32)
    launch = dict(grid=(batch, heads, length // chunk), **launch_options(interpret, num_warps))

    d_values_solved, d_w_transition, d_decayed, values_writes, trace_gates = pl.pallas_call(
        functools.partial(_transition_side_kernel, precision=precision),
        in_specs=[group_rows, head_values, head_keys, head_gates,
                  pl.BlockSpec((None, None, None, key_dim, key_dim), lambda b, h, n: (b, h, n, 0, 0)),
                  pl.BlockSpec((None, None, None, key_dim, value_dim), lambda b, h, n: (b, h, n, 0, 0))],
        out_specs=[head_values, head_keys, head_keys, head_keys, head_gates],
        out_shape=[jax.ShapeDtypeStruct(v.shape, jnp.float32), keys_shape, keys_shape, keys_shape, gates_shape],
        name="loglinear_gdn_chunk_grads_transition", **launch,
    )(k, v, w, cum, d_transitions, d_writes)
    dv, d_lam_rows, d_solved, d_w = pl.pallas_call(
        functools.partial(_value_side_kernel, in_chunk_levels=in_chunk_levels, precision=precision),
        in_specs=[group_rows, group_rows, head_values, head_values, head_square, head_gates, head_gates, lam_spec,
                  head_keys, head_values, head_keys],
        out_specs=[head_values, lam_spec, head_square, head_keys],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(lam_rows.shape, jnp.float32),
                   jax.ShapeDtypeStruct(inverse.shape, jnp.float32), keys_shape],
        name="loglinear_gdn_chunk_grads_values", **launch,
    )(q, k, v, d_out, inverse, beta, cum, lam_rows, d_queries, d_values_solved, d_w_transition)
    d_beta, dk_partial, d_gates_partial = pl.pallas_call(
        functools.partial(_coupling_side_kernel, precision=precision),
        in_specs=[group_rows, head_square, head_gates, head_gates, head_square, head_keys, head_keys, head_keys,
                  head_gates],
        out_specs=[head_gates, head_keys, head_gates],
        out_shape=[gates_shape, keys_shape, gates_shape],
        name="loglinear_gdn_chunk_grads_coupling", **launch,
    )(k, inverse, beta, cum, d_solved, d_w, d_decayed, values_writes, trace_gates)
    dq, dk, d_log_a = pl.pallas_call(
        functools.partial(_score_side_kernel, in_chunk_levels=in_chunk_levels, precision=precision),
        in_specs=[group_rows, group_rows, head_values, head_values, head_keys, head_square, head_gates, head_gates,
                  lam_spec, head_keys, head_keys, head_gates],
        out_specs=[head_keys, head_keys, head_gates],
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, key_dim), key_dtype),
                   jax.ShapeDtypeStruct((batch, length, heads, key_dim), key_dtype), gates_shape],
        name="loglinear_gdn_chunk_grads_score", **launch,
    )(q, k, v, d_out, w, inverse, beta, cum, lam_rows, d_queries, dk_partial, d_gates_partial)
    return dq, dk, dv, d_beta, d_log_a, d_lam_rows
