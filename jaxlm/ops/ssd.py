"""State-space duality (SSD): the scalar-gated linear attention at the core of Mamba-2 (Dao & Gu 2024, §3–§6).

Per head a state ``S_t ∈ R^{K×V}`` evolves as

    S_t = a_t S_{t-1} + k_t v_tᵀ,    o_t = S_tᵀ q_t,    a_t = exp(log_a_t) ∈ (0, 1],

which unrolls to the masked-attention (dual) form

    o_t = Σ_{s≤t} exp(Σ_{r=s+1..t} log_a_r) (q_t·k_s) v_s  +  exp(Σ_{r≤t} log_a_r) S_{-1}ᵀ q_t.

Shapes: ``q, k: [B, T, G, K]`` (G head groups), ``v: [B, T, H, V]``, ``log_a: [B, T, H]`` (≤ 0), head h reads
group ``h // (H // G)``; states ``[B, H, K, V]`` float32. No hidden scaling.

Packed sequences (``segment_ids [B, T]``): the state resets to zero at every token whose id differs from the
previous token's, so a token sees only its own segment. ``initial_state`` belongs to the segment of token 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.registry import kernels_unless_unsupported

SSD_IMPLS = ("recurrent", "chunked", "pallas", "auto")


def ssd(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, *,
        initial_state: jax.Array | None = None, return_final_state: bool = False, impl: str = "chunked",
        chunk_size: int = 64, segment_ids: jax.Array | None = None):
    """SSD / Mamba-2 scan ``S_t = a_t S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` (Dao & Gu 2024, §3 and §6).

    Args:
      q, k: ``[B, T, G, K]`` queries (Mamba-2's C) and keys (B).
      v: ``[B, T, H, V]`` values (``x·dt``); ``H % G == 0``.
      log_a: ``[B, T, H]`` log decay, ``≤ 0``.
      initial_state: ``[B, H, K, V]`` state before token 0 (zeros when None).
      return_final_state: also return the state after the last token.
      impl: ``"recurrent"`` (a scan over time, the reference), ``"chunked"`` (the chunkwise SSD form),
        ``"pallas"`` (``pallas_kernels.ssd``: Pallas forward and backward kernels, interpret mode on CPU;
        segment ids supported) or ``"auto"`` (the kernels on a GPU when they take the inputs, else chunked:
        ``pallas_kernels.registry.kernels_unless_unsupported``).
      chunk_size: tokens per chunk of the chunked form (any T is accepted). The Pallas kernels choose their
        own chunk per backend (``pallas_kernels.ssd.ssd_blocks``).
      segment_ids: ``[B, T]`` int; the state resets where the id changes from the previous token.

    Returns:
      ``o [B, T, H, V]`` in ``v``'s dtype, or ``(o, final_state [B, H, K, V] float32)``.
    """
    _check_inputs(q, k, v, log_a, initial_state, segment_ids, impl, chunk_size)
    batch_size, _, num_heads, value_dim = v.shape
    if initial_state is None:
        initial_state = jnp.zeros((batch_size, num_heads, q.shape[-1], value_dim), jnp.float32)
    starts = _segment_starts(segment_ids, v.shape[:2])  # [B, T] bool

    def chunked():
        return _ssd_chunked(q, k, v, log_a, initial_state, starts, chunk_size)

    def kernels():
        from pallas_kernels.ssd import ssd_pallas  # imported here: the XLA impls do not need the kernels

        return ssd_pallas(q, k, v, log_a, initial_state, segment_ids=segment_ids)

    if impl == "recurrent":
        out, final_state = _ssd_recurrent(q, k, v, log_a, initial_state, starts)
    elif impl == "chunked":
        out, final_state = chunked()
    elif impl == "pallas":
        out, final_state = kernels()
    else:
        out, final_state = kernels_unless_unsupported(kernels, chunked)
    out = out.astype(v.dtype)
    return (out, final_state) if return_final_state else out


def ssd_step(state: jax.Array, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array,
             log_a_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decode step: ``S = exp(log_a_t) S + k_t v_tᵀ``, ``o_t = Sᵀ q_t`` (Dao & Gu 2024, §3.1).

    ``state [B, H, K, V]`` float32, ``q_t, k_t [B, G, K]``, ``v_t [B, H, V]``, ``log_a_t [B, H]`` ->
    (``o_t [B, H, V]`` in ``v_t``'s dtype, new state float32).
    """
    batch_size, num_heads, key_dim, value_dim = state.shape
    num_groups = q_t.shape[1]
    if num_heads % num_groups != 0:
        raise ValueError(f"ssd_step: heads H={num_heads} must be a multiple of groups G={num_groups}")
    heads_per_group = num_heads // num_groups
    grouped_state = state.astype(jnp.float32).reshape(batch_size, num_groups, heads_per_group, key_dim, value_dim)
    v32 = v_t.astype(jnp.float32).reshape(batch_size, num_groups, heads_per_group, value_dim)  # [B, G, R, V]
    decay = jnp.exp(log_a_t.astype(jnp.float32)).reshape(batch_size, num_groups, heads_per_group)  # [B, G, R]
    write = jnp.einsum("bgk,bgrv->bgrkv", k_t.astype(jnp.float32), v32)  # [B, G, R, K, V]
    grouped_state = decay[..., None, None] * grouped_state + write
    out = jnp.einsum("bgk,bgrkv->bgrv", q_t.astype(jnp.float32), grouped_state)  # [B, G, R, V]
    return (out.reshape(batch_size, num_heads, value_dim).astype(v_t.dtype),
            grouped_state.reshape(batch_size, num_heads, key_dim, value_dim))


def _check_inputs(q, k, v, log_a, initial_state, segment_ids, impl, chunk_size) -> None:
    """Raise a ValueError naming the first argument whose shape or value the ops contract does not allow."""
    if impl not in SSD_IMPLS:
        raise ValueError(f"ssd: impl={impl!r} is not one of {SSD_IMPLS}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"ssd: chunk_size={chunk_size!r} must be a positive integer")
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"ssd: q and k must both be [B, T, G, K], got q {q.shape} and k {k.shape}")
    batch_size, length, num_groups, key_dim = q.shape
    if v.ndim != 4 or v.shape[:2] != (batch_size, length):
        raise ValueError(f"ssd: v must be [B={batch_size}, T={length}, H, V], got {v.shape}")
    num_heads = v.shape[2]
    if num_heads % num_groups != 0:
        raise ValueError(f"ssd: v's heads H={num_heads} must be a multiple of q/k's groups G={num_groups}")
    if log_a.shape != (batch_size, length, num_heads):
        raise ValueError(f"ssd: log_a must be [B, T, H]={(batch_size, length, num_heads)}, got {log_a.shape}")
    state_shape = (batch_size, num_heads, key_dim, v.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"ssd: initial_state must be [B, H, K, V]={state_shape}, got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (batch_size, length):
        raise ValueError(f"ssd: segment_ids must be [B, T]={(batch_size, length)}, got {segment_ids.shape}")


def _segment_starts(segment_ids: jax.Array | None, batch_and_length: tuple[int, int]) -> jax.Array:
    """``[B, T]`` bool: True where a new segment starts (the id differs from the previous token's); never at t=0."""
    if segment_ids is None:
        return jnp.zeros(batch_and_length, bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]  # [B, T-1]
    return jnp.pad(changed, ((0, 0), (1, 0)), constant_values=False)


def _ssd_recurrent(q, k, v, log_a, initial_state, starts) -> tuple[jax.Array, jax.Array]:
    """Reference form: ``lax.scan`` of ``ssd_step`` over time, zeroing the state at segment starts."""

    def step(state, inputs):
        q_t, k_t, v_t, log_a_t, start_t = inputs
        state = jnp.where(start_t[:, None, None, None], 0.0, state)  # [B, H, K, V]
        o_t, state = ssd_step(state, q_t, k_t, v_t.astype(jnp.float32), log_a_t)
        return state, o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_a, starts)]
    final_state, out = jax.lax.scan(step, initial_state.astype(jnp.float32), time_major)
    return jnp.moveaxis(out, 0, 1), final_state  # [B, T, H, V] float32


def _ssd_chunked(q, k, v, log_a, initial_state, starts, chunk_size) -> tuple[jax.Array, jax.Array]:
    """Chunkwise SSD (Dao & Gu 2024, §6): within a chunk of C tokens the dual form
    ``O_intra = (Q Kᵀ ⊙ L) V`` with ``L_ts = exp(cum_t − cum_s)`` (s ≤ t, same segment) and ``cum`` the
    within-chunk cumulative log gates; across chunks a scan carries the state ``S`` with
    ``S_next = exp(cum_last) S + Σ_s exp(cum_last − cum_s) k_s v_sᵀ`` and ``O_inter[t] = exp(cum_t) Sᵀ q_t``.

    T is padded to a multiple of C with ``log_a = 0`` and ``k = v = 0``, which leaves the state unchanged.
    """
    batch_size, length, num_groups, key_dim = q.shape
    num_heads, value_dim = v.shape[2], v.shape[3]
    heads_per_group = num_heads // num_groups
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    chunk_shape = (batch_size, num_chunks, chunk_size)

    def to_chunks(x, fill=0):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(chunk_shape + x.shape[2:])

    q_c = to_chunks(q.astype(jnp.float32))  # [B, N, C, G, K]
    k_c = to_chunks(k.astype(jnp.float32))  # [B, N, C, G, K]
    v_c = to_chunks(v.astype(jnp.float32)).reshape(chunk_shape + (num_groups, heads_per_group, value_dim))
    log_a_c = to_chunks(log_a.astype(jnp.float32)).reshape(chunk_shape + (num_groups, heads_per_group))
    cum = jnp.cumsum(log_a_c, axis=2)  # [B, N, C, G, R] within-chunk cumulative log gates
    # Segment index of every token (number of segment starts so far); padding continues the last segment.
    run = to_chunks(jnp.cumsum(starts.astype(jnp.int32), axis=1))  # [B, N, C]
    run = jnp.where(jnp.arange(num_chunks * chunk_size).reshape(num_chunks, chunk_size) < length, run,
                    run.reshape(batch_size, -1)[:, length - 1, None, None])
    run_entering = jnp.concatenate([run[:, :1, :1], run[:, :-1, -1:]], axis=1)  # [B, N, 1] segment of the state

    out_intra = _intra_chunk_outputs(q_c, k_c, v_c, cum, run)  # [B, N, C, G, R, V]
    chunk_writes, chunk_decay, keeps_state = _chunk_state_updates(k_c, v_c, cum, run, run_entering)
    grouped_initial = initial_state.astype(jnp.float32).reshape(
        batch_size, num_groups, heads_per_group, key_dim, value_dim)
    entering_states, final_state = _scan_chunk_states(grouped_initial, chunk_writes, chunk_decay, keeps_state)

    sees_state = (run == run_entering)[..., None, None]  # [B, N, C, 1, 1]
    state_decay = jnp.where(sees_state, jnp.exp(cum), 0.0)  # [B, N, C, G, R]
    out_inter = jnp.einsum("bncgk,bngrkv->bncgrv", q_c, entering_states) * state_decay[..., None]
    out = (out_intra + out_inter).reshape(batch_size, num_chunks * chunk_size, num_heads, value_dim)
    return out[:, :length], final_state.reshape(batch_size, num_heads, key_dim, value_dim)


def _intra_chunk_outputs(q_c, k_c, v_c, cum, run) -> jax.Array:
    """``O_intra[t] = Σ_{s≤t, same segment} exp(cum_t − cum_s) (q_t·k_s) v_s`` inside each chunk.

    ``q_c, k_c [B, N, C, G, K]``, ``v_c [B, N, C, G, R, V]``, ``cum [B, N, C, G, R]``, ``run [B, N, C]`` ->
    ``[B, N, C, G, R, V]`` float32.
    """
    chunk_size = q_c.shape[2]
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))  # [C(t), C(s)]
    visible = causal & (run[..., :, None] == run[..., None, :])  # [B, N, C, C]
    visible = visible[:, :, None, None]  # [B, N, 1, 1, C, C]
    log_decay = cum.transpose(0, 1, 3, 4, 2)  # [B, N, G, R, C]
    gap = log_decay[..., :, None] - log_decay[..., None, :]  # [B, N, G, R, C(t), C(s)]
    decay = jnp.where(visible, jnp.exp(jnp.where(visible, gap, 0.0)), 0.0)  # masked before exp: no inf
    scores = jnp.einsum("bntgk,bnsgk->bngts", q_c, k_c)  # [B, N, G, C, C], shared by the group's heads
    return jnp.einsum("bngrts,bnsgrv->bntgrv", scores[:, :, :, None] * decay, v_c)


def _chunk_state_updates(k_c, v_c, cum, run, run_entering):
    """What each chunk does to the carried state: ``S_out = keeps · exp(cum_last) S_in + W``.

    ``W = Σ_s exp(cum_last − cum_s) k_s v_sᵀ`` over the chunk's tokens in its last token's segment;
    ``keeps`` is False when a segment starts inside the chunk. Returns ``W [B, N, G, R, K, V]``,
    ``exp(cum_last) [B, N, G, R]`` and ``keeps [B, N]``.
    """
    cum_last = cum[:, :, -1]  # [B, N, G, R]
    in_last_segment = (run == run[:, :, -1:])[..., None, None]  # [B, N, C, 1, 1]
    write_decay = jnp.where(in_last_segment, jnp.exp(cum_last[:, :, None] - cum), 0.0)  # [B, N, C, G, R]
    writes = jnp.einsum("bncgk,bncgr,bncgrv->bngrkv", k_c, write_decay, v_c)  # [B, N, G, R, K, V]
    keeps_state = run[:, :, -1] == run_entering[:, :, 0]  # [B, N]
    return writes, jnp.exp(cum_last), keeps_state


def _scan_chunk_states(initial_state, chunk_writes, chunk_decay, keeps_state):
    """Scan over chunks: the state entering each chunk ``[B, N, G, R, K, V]`` and the final state."""

    def step(state, inputs):
        writes, decay, keeps = inputs
        carried = jnp.where(keeps[:, None, None, None, None], decay[..., None, None] * state, 0.0)
        return carried + writes, state

    chunk_major = [jnp.moveaxis(x, 1, 0) for x in (chunk_writes, chunk_decay, keeps_state)]
    final_state, entering = jax.lax.scan(step, initial_state, chunk_major)
    return jnp.moveaxis(entering, 0, 1), final_state
