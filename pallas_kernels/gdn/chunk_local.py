"""The gated delta rule of every chunk from its entering state, in XLA, all chunks at once (no scan).

With the entering states ``S_n`` known (the forward kernels store them), each chunk is an independent map
(Yang, Kautz, Hatamizadeh 2025, §3.2; the WY/UT form of ``jaxlm.ops.delta_rule_chunked``):

    U = U₀ − W S_n,    O_n = (Q ⊙ γ) S_n + ((Q Kᵀ) ⊙ Γ) U,    S_{n+1} = γ_C S_n + (K ⊙ Γ_{C,:})ᵀ U.

Its VJP with the output cotangents ``dO_n`` and the total cotangents ``dS_{n+1}`` of the leaving states (from
the reverse kernel of ``kernel_bwd``) is exactly the gradient of the whole sequence: every input of chunk n
reaches the loss only through ``(O_n, S_{n+1})``. The cotangent it returns for ``S_0`` is the initial state's.
Packed sequences: with the segment ``starts`` the decay factors are masked as in the XLA chunked form
(``decay_masks``: ``Γ`` within a segment, ``γ`` before the chunk's first start, ``γ_C`` only without one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_local_outputs(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array,
                        states: jax.Array, chunk: int,
                        starts: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a, beta [B, T, H]``, entering states
    ``[B, H, N, K, V]`` -> (``O [B, T, H, V]`` float32, leaving states ``[B, H, N, K, V]`` float32). ``starts
    [B, T]`` bool: segment starts of packed sequences (state resets), None for one sequence per row."""
    from jaxlm.ops.delta_rule_chunked import (decay_masks, pad_time, pseudo_value_parts, split_chunks,
                                              expand_head_groups)  # the XLA chunked form's own pieces

    batch, length, heads, value_dim = v.shape
    padding = -length % chunk
    q, k = (pad_time(expand_head_groups(x, heads), padding) for x in (q, k))  # [B, T', H, K]
    v = pad_time(v.astype(jnp.float32), padding)  # [B, T', H, V]
    log_a, beta = (pad_time(x.astype(jnp.float32), padding) for x in (log_a, beta))  # [B, T', H]
    q, k, v, log_a, beta = (split_chunks(x, chunk) for x in (q, k, v, log_a, beta))  # [B, N, H, C, ...]
    if starts is None:
        resets = jnp.zeros(log_a.shape[:2] + (chunk,), bool)  # [B, N, C]
    else:
        resets = pad_time(starts, padding).reshape(batch, -1, chunk)  # [B, N, C]
    ratios, from_chunk_start = decay_masks(log_a, resets)  # Γ [B, N, H, C, C], γ [B, N, H, C]
    values_part, state_part = pseudo_value_parts(k, v, beta, ratios, from_chunk_start)  # U₀, W
    entering = jnp.swapaxes(states.astype(jnp.float32), 1, 2)  # [B, N, H, K, V]
    pseudo = values_part - jnp.einsum("bnhck,bnhkv->bnhcv", state_part, entering)  # U  [B, N, H, C, V]
    scores = jnp.einsum("bnhik,bnhjk->bnhij", q, k) * ratios  # [B, N, H, C, C]
    out = (jnp.einsum("bnhck,bnhkv->bnhcv", q * from_chunk_start[..., None], entering)
           + jnp.einsum("bnhij,bnhjv->bnhiv", scores, pseudo))  # [B, N, H, C, V]
    leaving = (from_chunk_start[..., -1, None, None] * entering
               + jnp.einsum("bnhck,bnhcv->bnhkv", k * ratios[..., -1, :, None], pseudo))  # [B, N, H, K, V]
    out = jnp.swapaxes(out, 2, 3).reshape(batch, -1, heads, value_dim)[:, :length]  # [B, T, H, V]
    return out, jnp.swapaxes(leaving, 1, 2)
