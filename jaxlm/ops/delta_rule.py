"""Gated delta rule (Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

Per head, with state ``S_t ∈ R^{K×V}`` (float32):

    S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ q_t,    a_t = exp(log_a_t).

Shapes follow the ops contract: ``q, k [B, T, G, K]`` (G head groups), ``v [B, T, H, V]``, ``log_a, beta
[B, T, H]``, ``H % G == 0``, head ``h`` reads group ``h // (H // G)``. No hidden scaling: the caller
normalises k and scales q. ``impl="recurrent"`` scans over time; ``impl="chunked"`` is the WY/UT chunkwise
form of ``jaxlm.ops.delta_rule_chunked``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.delta_rule_chunked import expand_head_groups, gated_delta_rule_chunked, segment_starts
from pallas_kernels.registry import kernels_unless_unsupported

IMPLS = ("recurrent", "chunked", "pallas", "auto")


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array, *,
                     initial_state: jax.Array | None = None, return_final_state: bool = False,
                     impl: str = "chunked", chunk_size: int = 64,
                     segment_ids: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Gated delta rule over a sequence (GDN paper §3):
    ``S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t``.

    Args:
      q, k: ``[B, T, G, K]`` queries and (normalised) keys.
      v: ``[B, T, H, V]`` values, ``H % G == 0``.
      log_a: ``[B, T, H]`` log decay (≤ 0); beta: ``[B, T, H]`` write strength (in [0, 1] for a contraction).
      initial_state: ``[B, H, K, V]`` state before step 0 (zeros when None).
      return_final_state: also return the state after the last step.
      impl: ``"recurrent"`` (scan over time), ``"chunked"`` (WY/UT chunkwise), ``"pallas"``
        (``pallas_kernels.gdn``: Pallas kernels, interpret mode on CPU) or ``"auto"`` (the kernels on a GPU when
        they take the inputs, else chunked: ``pallas_kernels.registry.kernels_unless_unsupported``).
      chunk_size: chunk length C of the chunked form (any T works: the last chunk is padded).
      segment_ids: ``[B, T]`` int ids of packed sequences; the state resets to zero where the id changes
        (step 0 continues ``initial_state``).

    Returns ``o [B, T, H, V]`` in v's dtype, or ``(o, final_state [B, H, K, V] float32)``.
    """
    _check_inputs(q, k, v, log_a, beta, initial_state, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"gated_delta_rule impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"gated_delta_rule chunk_size must be a positive integer, got {chunk_size!r}")
    batch_size, length, num_heads, value_dim = v.shape
    if initial_state is None:
        initial_state = jnp.zeros((batch_size, num_heads, q.shape[-1], value_dim), jnp.float32)
    initial_state = initial_state.astype(jnp.float32)
    starts = segment_starts(segment_ids, batch_size, length)  # [B, T]

    def chunked():
        return gated_delta_rule_chunked(q, k, v, log_a, beta, initial_state, starts, chunk_size)

    def kernels():
        from pallas_kernels.gdn import gated_delta_rule_pallas  # the kernels import jaxlm.ops for their backward

        return gated_delta_rule_pallas(q, k, v, log_a, beta, initial_state, chunk_size, segment_ids=segment_ids)

    if impl == "recurrent":
        out, final_state = _gated_delta_rule_recurrent(q, k, v, log_a, beta, initial_state, starts)
    elif impl == "pallas":
        out, final_state = kernels()
    elif impl == "chunked":
        out, final_state = chunked()
    else:
        out, final_state = kernels_unless_unsupported(kernels, chunked)
    out = out.astype(v.dtype)
    return (out, final_state) if return_final_state else out


def gated_delta_rule_step(state: jax.Array, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, log_a_t: jax.Array,
                          beta_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decode step: ``S = a (I − β k kᵀ) S + β k vᵀ``, ``o = Sᵀ q`` (GDN paper §3).

    ``state [B, H, K, V]``, ``q_t, k_t [B, G, K]``, ``v_t [B, H, V]``, ``log_a_t, beta_t [B, H]`` ->
    (``o_t [B, H, V]`` in v_t's dtype, new state float32).
    """
    num_heads = v_t.shape[1]
    q_t, k_t = expand_head_groups(q_t, num_heads), expand_head_groups(k_t, num_heads)  # [B, H, K]
    state = state.astype(jnp.float32)
    decay = jnp.exp(log_a_t.astype(jnp.float32))[..., None, None]  # [B, H, 1, 1]
    beta_t = beta_t.astype(jnp.float32)[..., None]  # [B, H, 1]
    k_state = jnp.einsum("bhk,bhkv->bhv", k_t, state)  # kᵀ S  [B, H, V]
    erased = state - jnp.einsum("bhk,bhv->bhkv", beta_t * k_t, k_state)  # (I − β k kᵀ) S
    written = jnp.einsum("bhk,bhv->bhkv", beta_t * k_t, v_t.astype(jnp.float32))  # β k vᵀ
    state = decay * erased + written  # [B, H, K, V]
    out = jnp.einsum("bhk,bhkv->bhv", q_t, state)  # [B, H, V]
    return out.astype(v_t.dtype), state


def _gated_delta_rule_recurrent(q, k, v, log_a, beta, initial_state, starts) -> tuple[jax.Array, jax.Array]:
    """``lax.scan`` of ``gated_delta_rule_step`` over time; the state is zeroed before a segment start.

    Returns (``o [B, T, H, V]`` float32, final state ``[B, H, K, V]``).
    """

    def one_step(state, inputs):
        q_t, k_t, v_t, log_a_t, beta_t, start_t = inputs
        state = jnp.where(start_t[:, None, None, None], 0.0, state)
        out_t, state = gated_delta_rule_step(state, q_t, k_t, v_t.astype(jnp.float32), log_a_t, beta_t)
        return state, out_t

    time_major = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (q, k, v, log_a, beta, starts))
    final_state, out = jax.lax.scan(one_step, initial_state, time_major)  # out: [T, B, H, V]
    return jnp.moveaxis(out, 0, 1), final_state


def _check_inputs(q, k, v, log_a, beta, initial_state, segment_ids) -> None:
    """Raise ValueError naming the first argument whose shape breaks the ops contract."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"gated_delta_rule q and k must both be [B, T, G, K], got q {q.shape} and k {k.shape}")
    if v.ndim != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gated_delta_rule v must be [B, T, H, V] with q's B, T = {q.shape[:2]}, got {v.shape}")
    batch_size, length, num_groups, key_dim = q.shape
    num_heads, value_dim = v.shape[2], v.shape[3]
    if num_heads % num_groups != 0:
        raise ValueError(f"gated_delta_rule needs H % G == 0 (heads of v: {num_heads}, groups of q/k: {num_groups})")
    for name, gate in (("log_a", log_a), ("beta", beta)):
        if gate.shape != (batch_size, length, num_heads):
            raise ValueError(f"gated_delta_rule {name} must be [B, T, H] = {(batch_size, length, num_heads)}, "
                             f"got {gate.shape}")
    state_shape = (batch_size, num_heads, key_dim, value_dim)
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"gated_delta_rule initial_state must be [B, H, K, V] = {state_shape}, "
                         f"got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (batch_size, length):
        raise ValueError(f"gated_delta_rule segment_ids must be [B, T] = {(batch_size, length)}, "
                         f"got {segment_ids.shape}")
