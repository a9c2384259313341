"""Chunked (O(T log T)) form of log-linear SSD and log-linear Gated DeltaNet (Guo et al. 2025, section 3.2).

Both ops compute ``o_t = Σ_{s<=t} λ_t^{level(t,s)} · (q_tᵀ A_t … A_{s+1} β_s k_s) v_s``. Split the sequence
into chunks of C tokens. Per chunk, with ``A`` the per-token transitions (SSD: ``a_r I``, GDN:
``a_r (I − β_r k_r k_rᵀ)``), precompute

- ``pair_weights[t, s] = q_tᵀ A_t … A_{s+1} β_s k_s`` for ``s <= t`` in the chunk (the dense C×C block),
- ``query_from_state[t] = (A_t … A_first)ᵀ q_t`` (reads a state entering the chunk),
- ``key_to_end[s] = A_last … A_{s+1} β_s k_s`` (carries a write to the chunk end),
- ``chunk_transition = A_last … A_first``.

The output is the dense block weighted by ``λ_t^{level(t,s)}`` plus, for each level that crosses chunk
boundaries, one linear-attention scan over the chunks with that level's per-token write/read/reset masks
(``fenwick.level_masks``); the transitions act on every level's state at every chunk. Without segment
ids the buckets of levels ``<= log2 C`` never leave a chunk, and for higher levels the masks are constant
over a chunk: chunk c reads if bit ``ℓ`` of c is 1, writes if it is 0, and the state resets after chunk
c when ``c mod 2^{ℓ+1} == 2^{ℓ+1} − 1`` (chunk level ``ℓ`` = token level ``ℓ + log2 C + 1``). Level
resets and segment boundaries are masks on final entries, never folded into the UT inverse.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxlm.ops.fenwick import fenwick_level, level_masks, segment_positions


class ChunkTerms(NamedTuple):
    """Per-chunk transition terms (shapes for ``[B, H, N, C]`` chunked tokens)."""

    pair_weights: jax.Array  # [B, H, N, C, C]
    query_from_state: jax.Array  # [B, H, N, C, K]
    key_to_end: jax.Array  # [B, H, N, C, K]
    chunk_transition: jax.Array  # SSD: [B, H, N] scalar decay; GDN: [B, H, N, K, K]


def _decay_ratios(log_a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``log_a [B, H, N, C]`` -> (``Γ[t, s] = exp(g_t − g_s)`` for ``s <= t`` else 0 ``[B, H, N, C, C]``,
    ``γ_t = exp(g_t)``, ``exp(g_last − g_s)``), ``g`` the within-chunk cumulative sum of ``log_a``."""
    chunk = log_a.shape[-1]
    cumulative = jnp.cumsum(log_a, axis=-1)  # [B, H, N, C]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    difference = cumulative[..., :, None] - cumulative[..., None, :]  # [B, H, N, C, C]
    ratios = jnp.where(causal, jnp.exp(jnp.where(causal, difference, 0.0)), 0.0)
    to_end = jnp.exp(cumulative[..., -1:] - cumulative)  # [B, H, N, C]
    return ratios, jnp.exp(cumulative), to_end


def ssd_chunk_terms(q: jax.Array, k: jax.Array, log_a: jax.Array) -> ChunkTerms:
    """SSD terms: ``pair = (q_t·k_s) Γ[t, s]``, ``query = γ_t q_t``, ``key = exp(g_last − g_s) k_s``,
    transition ``γ_last`` (Mamba-2 section 6, the chunked SSD algorithm).

    ``q, k: [B, H, N, C, K]`` float32, ``log_a: [B, H, N, C]``.
    """
    ratios, decay, to_end = _decay_ratios(log_a)
    pair_weights = jnp.einsum("bhntk,bhnsk->bhnts", q, k) * ratios  # [B, H, N, C, C]
    return ChunkTerms(pair_weights, decay[..., None] * q, to_end[..., None] * k, decay[..., -1])


def delta_chunk_terms(q: jax.Array, k: jax.Array, log_a: jax.Array, beta: jax.Array) -> ChunkTerms:
    """Gated DeltaNet terms through the UT transform (Yang et al. 2024, section 3.2).

    ``𝒯 = (I + strictlower(diag(β)(K Kᵀ ⊙ Γ)))⁻¹`` (float32 triangular solve); with ``W = 𝒯 diag(βγ) K``:
    ``pair = (Q Kᵀ ⊙ Γ) 𝒯 diag(β)``, ``query = diag(γ) Q − (Q Kᵀ ⊙ Γ) W``,
    ``key[s] = β_s Σ_j 𝒯[j, s] exp(g_last − g_j) k_j``, transition ``γ_last I − Kᵀ diag(exp(g_last − g)) W``.
    ``q, k: [B, H, N, C, K]``, ``log_a, beta: [B, H, N, C]``, all float32.
    """
    chunk, key_dim = q.shape[-2], q.shape[-1]
    ratios, decay, to_end = _decay_ratios(log_a)
    strictly_lower = jnp.tril(jnp.ones((chunk, chunk), q.dtype), -1)
    key_gram = jnp.einsum("bhntk,bhnsk->bhnts", k, k)  # [B, H, N, C, C]
    interaction = beta[..., :, None] * key_gram * ratios * strictly_lower
    identity = jnp.eye(chunk, dtype=q.dtype)
    ut_inverse = lax.linalg.triangular_solve(identity + interaction, jnp.broadcast_to(identity, interaction.shape),
                                             left_side=True, lower=True, unit_diagonal=True)  # [B, H, N, C, C]
    decayed_keys = jnp.einsum("bhnts,bhnsk->bhntk", ut_inverse, (beta * decay)[..., None] * k)  # W [B,H,N,C,K]
    query_key = jnp.einsum("bhntk,bhnsk->bhnts", q, k) * ratios  # [B, H, N, C, C]
    pair_weights = jnp.einsum("bhntj,bhnjs->bhnts", query_key, ut_inverse) * beta[..., None, :]
    query_from_state = decay[..., None] * q - jnp.einsum("bhnts,bhnsk->bhntk", query_key, decayed_keys)
    key_to_end = beta[..., None] * jnp.einsum("bhnjs,bhnj,bhnjk->bhnsk", ut_inverse, to_end, k)
    chunk_transition = (decay[..., -1, None, None] * jnp.eye(key_dim, dtype=q.dtype)
                        - jnp.einsum("bhnjk,bhnj,bhnjl->bhnkl", k, to_end, decayed_keys))  # [B, H, N, K, K]
    return ChunkTerms(pair_weights, query_from_state, key_to_end, chunk_transition)


def level_weights(lam: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Dense in-chunk weights ``λ_t^{level(p_t, p_s)}`` where t, s share a segment, else 0.

    ``lam: [B, H, N, C, L]``, ``positions, segment_ids: [B, N, C]`` -> ``[B, H, N, C, C]``.
    """
    levels = fenwick_level(positions[..., :, None], positions[..., None, :])  # [B, N, C, C]
    same_segment = segment_ids[..., :, None] == segment_ids[..., None, :]  # [B, N, C, C]
    selector = jax.nn.one_hot(levels, lam.shape[-1], dtype=lam.dtype) * same_segment[..., None]
    return jnp.einsum("bhntl,bntsl->bhnts", lam, selector)


def _level_scan_masks(positions: jax.Array, segment_ids: jax.Array, level: int, chunk: int):
    """Chunked masks of one level: (``read`` with no reset since the chunk start, ``write`` with no reset
    until the chunk end, ``keep`` = no reset in the chunk). ``[B, T]`` -> ``[B, N, C]`` x2, ``[B, N]``."""
    write, read, reset = level_masks(positions, segment_ids, level)
    shape = positions.shape[:1] + (-1, chunk)
    resets_so_far = jnp.cumsum(reset.reshape(shape).astype(jnp.int32), axis=-1)  # [B, N, C]
    resets_in_chunk = resets_so_far[..., -1:]  # [B, N, 1]
    read_alive = read.reshape(shape) & (resets_so_far == 0)
    write_alive = write.reshape(shape) & (resets_so_far == resets_in_chunk)
    return read_alive, write_alive, resets_in_chunk[..., 0] == 0


def cross_chunk_output(terms: ChunkTerms, v: jax.Array, lam: jax.Array, positions: jax.Array,
                       segment_ids: jax.Array, levels: list[int]) -> jax.Array:
    """``Σ_{ℓ in levels} λ_t^{(ℓ)} · query_from_state[t] · S^{(ℓ)}_{chunk start}``, one fused scan over chunks.

    ``S^{(ℓ)} ← keep^{(ℓ)} · chunk_transition · S^{(ℓ)} + Σ_s write^{(ℓ)}_s key_to_end[s] v_sᵀ``.
    ``v: [B, H, N, C, V]``, ``lam: [B, H, N, C, L]``, ``positions, segment_ids: [B, T]`` -> ``[B, H, N, C, V]``.
    """
    chunk = v.shape[3]
    masks = [_level_scan_masks(positions, segment_ids, level, chunk) for level in levels]
    read = jnp.stack([lam[..., level] * m[0][:, None] for level, m in zip(levels, masks)])  # [Lc, B, H, N, C]
    write = jnp.stack([m[1][:, None] for m in masks]).astype(v.dtype)  # [Lc, B, 1, N, C]
    keep = jnp.stack([m[2][:, None] for m in masks]).astype(v.dtype)  # [Lc, B, 1, N]

    def chunk_first(x: jax.Array, axis: int) -> jax.Array:
        return jnp.moveaxis(x, axis, 0)

    xs = (chunk_first(terms.query_from_state, 2), chunk_first(terms.key_to_end, 2), chunk_first(v, 2),
          chunk_first(terms.chunk_transition, 2), chunk_first(read, 3), chunk_first(write, 3),
          chunk_first(keep, 3))
    batch, heads, _, _, key_dim = terms.query_from_state.shape
    states = jnp.zeros((len(levels), batch, heads, key_dim, v.shape[-1]), jnp.float32)  # [Lc, B, H, K, V]

    def step(states, chunk_terms):
        queries, keys, values, transition, read_c, write_c, keep_c = chunk_terms
        out = jnp.einsum("lbhc,bhck,lbhkv->bhcv", read_c, queries, states)  # [B, H, C, V]
        if transition.ndim == 2:  # SSD: scalar decay per (batch, head)
            carried = states * transition[None, :, :, None, None]
        else:  # GDN: K x K chunk transition
            carried = jnp.einsum("bhij,lbhjv->lbhiv", transition, states)
        written = jnp.einsum("bhck,lbhc,bhcv->lbhkv", keys, jnp.broadcast_to(write_c, read_c.shape), values)
        return keep_c[..., None, None] * carried + written, out

    _, outputs = lax.scan(step, states, xs)  # [N, B, H, C, V]
    return jnp.moveaxis(outputs, 0, 2)


def chunked_loglinear(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array | None,
                      lam: jax.Array, chunk_size: int, segment_ids: jax.Array | None) -> jax.Array:
    """Chunked log-linear attention (module docstring); ``beta is None`` selects SSD.

    ``q, k: [B, T, H, K]`` (heads already expanded), ``v: [B, T, H, V]``, ``log_a, beta: [B, T, H]``,
    ``lam: [B, T, H, L]`` with exactly ``num_levels(T)`` columns -> ``[B, T, H, V]`` float32.
    """
    batch, length = q.shape[:2]
    num_level_cols = lam.shape[-1]
    padded = -(-length // chunk_size) * chunk_size
    if segment_ids is None:
        segments = jnp.zeros((batch, padded), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (batch, padded))
        first_cross_level = chunk_size.bit_length()  # log2 C + 1: lower levels stay inside a chunk
    else:
        segments = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - length)), constant_values=-1)
        positions = segment_positions(segments)
        first_cross_level = 1

    def to_chunks(x: jax.Array) -> jax.Array:  # [B, T, H, ...] -> [B, H, N, C, ...] float32
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((batch, padded // chunk_size, chunk_size) + x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    q_c, k_c, v_c, log_a_c, lam_c = (to_chunks(x) for x in (q, k, v, log_a, lam))
    if beta is None:
        terms = ssd_chunk_terms(q_c, k_c, log_a_c)
    else:
        terms = delta_chunk_terms(q_c, k_c, log_a_c, to_chunks(beta))
    chunk_shape = (batch, padded // chunk_size, chunk_size)
    weights = terms.pair_weights * level_weights(lam_c, positions.reshape(chunk_shape), segments.reshape(chunk_shape))
    out = jnp.einsum("bhnts,bhnsv->bhntv", weights, v_c)  # [B, H, N, C, V]
    cross_levels = list(range(first_cross_level, num_level_cols))
    if cross_levels:
        out = out + cross_chunk_output(terms, v_c, lam_c, positions, segments, cross_levels)
    heads, value_dim = out.shape[1], out.shape[-1]
    out = jnp.moveaxis(out, 1, 3).reshape(batch, padded, heads, value_dim)  # [B, T_pad, H, V]
    return out[:, :length]
