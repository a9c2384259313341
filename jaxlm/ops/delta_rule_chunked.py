"""Chunkwise (WY/UT) form of the gated delta rule, and helpers shared with its recurrent form.

The recurrence (Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks", §3) per head, state ``S ∈ R^{K×V}``:

    S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ q_t.

Within a chunk of C steps starting from the state ``S_0`` (gates ``γ_i = Π_{r≤i} a_r``, ratios
``Γ_ij = γ_i / γ_j`` for ``j ≤ i``), rewrite each update as gated linear attention with pseudo-values
``u_i = β_i (v_i − a_i S_{i−1}ᵀ k_i)``:

    S_i = γ_i S_0 + Σ_{j≤i} Γ_ij k_j u_jᵀ,
    (I + L) U = diag(β) V − diag(β γ) K S_0,    L = strictlower(diag(β) K Kᵀ ⊙ Γ)  (UT transform, §3.2),
    o_i = γ_i S_0ᵀ q_i + Σ_{j≤i} Γ_ij (q_i·k_j) u_j,
    S_C = γ_C S_0 + Σ_j Γ_Cj k_j u_jᵀ.

Everything that does not depend on ``S_0`` (the triangular solve included) is computed for all chunks at
once; a ``lax.scan`` over chunks carries ``S``. A segment start resets the state, which is the same as
``a_t = 0`` there: the masks below zero every ratio ``Γ_ij`` whose range ``(j, i]`` holds a segment start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular


def expand_head_groups(x: jax.Array, num_heads: int) -> jax.Array:
    """``[..., G, K]`` -> ``[..., H, K]`` float32: head ``h`` takes group ``h // (H // G)``."""
    return jnp.repeat(x.astype(jnp.float32), num_heads // x.shape[-2], axis=-2)


def segment_starts(segment_ids: jax.Array | None, batch_size: int, length: int) -> jax.Array:
    """``[B, T]`` bool: True where ``segment_ids[t] != segment_ids[t − 1]`` (never at ``t = 0``, which
    continues the initial state); all False without segment ids."""
    if segment_ids is None:
        return jnp.zeros((batch_size, length), bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]  # [B, T-1]
    return jnp.pad(changed, ((0, 0), (1, 0)), constant_values=False)


def gated_delta_rule_chunked(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array,
                             initial_state: jax.Array, starts: jax.Array,
                             chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """The chunkwise gated delta rule (module docstring) on validated inputs.

    ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a, beta [B, T, H]``, ``initial_state [B, H, K, V]``
    float32, ``starts [B, T]`` bool (state resets). Returns (``o [B, T, H, V]`` float32, final state).
    The last chunk is padded with steps that leave the state unchanged (``β = 0``, ``log_a = 0``).
    """
    length, num_heads = v.shape[1], v.shape[2]
    padding = -length % chunk_size
    q, k = (pad_time(expand_head_groups(x, num_heads), padding) for x in (q, k))  # [B, T', H, K]
    v = pad_time(v.astype(jnp.float32), padding)  # [B, T', H, V]
    log_a = pad_time(log_a.astype(jnp.float32), padding)  # [B, T', H]
    beta = pad_time(beta.astype(jnp.float32), padding)  # [B, T', H]
    starts = pad_time(starts, padding)  # [B, T']
    q, k, v, log_a, beta = (split_chunks(x, chunk_size) for x in (q, k, v, log_a, beta))  # [B, N, H, C, ...]
    starts = starts.reshape(starts.shape[0], -1, chunk_size)  # [B, N, C]

    ratios, from_chunk_start = decay_masks(log_a, starts)  # [B, N, H, C, C], [B, N, H, C]
    values_part, state_part = pseudo_value_parts(k, v, beta, ratios, from_chunk_start)
    scores = jnp.einsum("bnhik,bnhjk->bnhij", q, k) * ratios  # [B, N, H, C, C]
    q_from_state = q * from_chunk_start[..., None]  # [B, N, H, C, K]
    k_to_chunk_end = k * ratios[..., -1, :, None]  # [B, N, H, C, K]
    chunk_decay = from_chunk_start[..., -1]  # [B, N, H]

    def one_chunk(state, chunk):
        values_part, state_part, scores, q_from_state, k_to_chunk_end, chunk_decay = chunk
        u = values_part - jnp.einsum("bhck,bhkv->bhcv", state_part, state)  # [B, H, C, V]
        out = jnp.einsum("bhck,bhkv->bhcv", q_from_state, state) + jnp.einsum("bhij,bhjv->bhiv", scores, u)
        state = chunk_decay[..., None, None] * state + jnp.einsum("bhck,bhcv->bhkv", k_to_chunk_end, u)
        return state, out

    chunks = (values_part, state_part, scores, q_from_state, k_to_chunk_end, chunk_decay)
    final_state, out = jax.lax.scan(one_chunk, initial_state, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), chunks))
    out = jnp.moveaxis(out, 0, 1)  # [B, N, H, C, V]
    out = jnp.swapaxes(out, 2, 3).reshape(out.shape[0], -1, num_heads, out.shape[-1])  # [B, T', H, V]
    return out[:, :length], final_state


def decay_masks(log_a: jax.Array, starts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Within-chunk decays with segment resets.

    ``log_a [B, N, H, C]``, ``starts [B, N, C]`` -> (``Γ [B, N, H, C, C]`` with ``Γ_ij = exp(g_i − g_j)`` for
    ``j ≤ i`` and no reset in ``(j, i]``, else 0; ``γ [B, N, H, C]`` with ``γ_i = exp(g_i)`` if no reset in
    ``[0, i]``, else 0), ``g`` the inclusive float32 cumulative sum of ``log_a`` within the chunk.
    """
    chunk_size = log_a.shape[-1]
    cumulative = jnp.cumsum(log_a, axis=-1)  # [B, N, H, C]
    resets_so_far = jnp.cumsum(starts.astype(jnp.int32), axis=-1)[:, :, None]  # [B, 1->N, 1, C]
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))  # [C, C]
    connected = causal & (resets_so_far[..., :, None] == resets_so_far[..., None, :])  # [B, N, 1, C, C]
    log_ratio = cumulative[..., :, None] - cumulative[..., None, :]  # [B, N, H, C, C]
    ratios = jnp.where(connected, jnp.exp(jnp.where(connected, log_ratio, 0.0)), 0.0)
    from_chunk_start = jnp.where(resets_so_far[:, :, 0][:, :, None] == 0, jnp.exp(cumulative), 0.0)
    return ratios, from_chunk_start


def pseudo_value_parts(k: jax.Array, v: jax.Array, beta: jax.Array, ratios: jax.Array,
                        from_chunk_start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Solve ``(I + L) U = diag(β) V − diag(β γ) K S_0`` for its two parts, in float32.

    ``k [B, N, H, C, K]``, ``v [B, N, H, C, V]``, ``beta [B, N, H, C]``, ``ratios`` Γ, ``from_chunk_start`` γ ->
    (``(I + L)⁻¹ diag(β) V  [B, N, H, C, V]``, ``(I + L)⁻¹ diag(β γ) K  [B, N, H, C, K]``), so that
    ``U = first − second @ S_0``. ``L = strictlower(diag(β) K Kᵀ ⊙ Γ)``; a unit-lower triangular solve.
    """
    chunk_size, value_dim = k.shape[-2], v.shape[-1]
    # Full float32 products for the triangular system (GPUs would otherwise use TF32 here).
    gram = jnp.einsum("bnhik,bnhjk->bnhij", k, k, precision=jax.lax.Precision.HIGHEST)  # [B, N, H, C, C]
    strictly_lower = jnp.tril(jnp.ones((chunk_size, chunk_size), bool), -1)
    lower = jnp.where(strictly_lower, beta[..., None] * gram * ratios, 0.0)  # L
    system = lower + jnp.eye(chunk_size, dtype=jnp.float32)  # [B, N, H, C, C]
    right_hand_sides = jnp.concatenate(
        [beta[..., None] * v, (beta * from_chunk_start)[..., None] * k], axis=-1)  # [B, N, H, C, V+K]
    solved = solve_triangular(system, right_hand_sides, lower=True, unit_diagonal=True)
    return solved[..., :value_dim], solved[..., value_dim:]


def pad_time(x: jax.Array, padding: int) -> jax.Array:
    """Append ``padding`` zeros (False) on the time axis 1."""
    return jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))


def split_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[B, T', H, ...]`` -> ``[B, N, H, C, ...]`` with ``T' = N·C``."""
    batch_size, length = x.shape[:2]
    chunks = x.reshape(batch_size, length // chunk_size, chunk_size, *x.shape[2:])  # [B, N, C, H, ...]
    return jnp.swapaxes(chunks, 2, 3)
