"""``ssd_pallas``: the SSD op (``jaxlm.ops.ssd`` semantics) on the Pallas kernels, as a ``jax.custom_vjp``.

Forward: ``kernel_fwd`` (chunk states, then chunk outputs); the entering chunk states are kept for the
backward. Backward: ``kernel_bwd`` (state cotangents in reverse, then every chunk's dq, dk, dv and gate terms in
parallel). The gate gradient: with ``C_t = Σ_{r≤t} log_a_r`` the global cumulative log gate, the output and the
final state depend on ``log_a`` only through ``C``, and

    ∂L/∂C_t = q_t·dq_t − k_t·dk_t + [t = T−1] <dS_final, S_final>,    d log_a_r = Σ_{t≥r} ∂L/∂C_t,

per head (dq, dk of that head before the group sum). Packed sequences (``segment_ids``): the state resets to zero
where the id changes; the kernels take the within-chunk segment runs (``segment_runs``) and mask every decay
factor (``common``). The gate formula is unchanged: the output and final state are still functions of the
differences of ``C`` (masks are constants), and the masked dq, dk hold exactly the unmasked terms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.delta_rule_chunked import segment_starts
from pallas_kernels.ssd.blocks import SSDBlocks, check_blocks, ssd_blocks
from pallas_kernels.ssd.kernel_bwd import chunk_grads, chunk_state_grads
from pallas_kernels.ssd.kernel_fwd import chunk_outputs, chunk_states


def ssd_pallas(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, initial_state: jax.Array,
               chunk_size: int | None = None, *, segment_ids: jax.Array | None = None,
               blocks: SSDBlocks | None = None, interpret=None) -> tuple[jax.Array, jax.Array]:
    """``S_t = a_t S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` on the kernels.

    ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a [B, T, H]``, ``initial_state [B, H, K, V]`` ->
    (``o [B, T, H, V]`` in ``v``'s dtype, final state ``[B, H, K, V]`` float32). ``segment_ids [B, T]`` int:
    packed sequences, the state resets to zero where the id differs from the previous token's
    (``initial_state`` belongs to token 0's segment); None: one sequence per row. ``blocks`` overrides the
    per-backend block sizes (tuning); ``interpret`` the interpret mode (None: interpret on a CPU backend; a
    test may pass ``pltpu.InterpretParams()`` with TPU blocks). Raises ``UnsupportedShapeError`` for head
    dims the kernels do not tile, ValueError for ``segment_ids`` of another shape than ``[B, T]``.
    """
    if blocks is None:
        blocks = ssd_blocks(q.shape[-1], v.shape[-1], chunk_size)
    check_blocks(blocks, q.shape[-1], v.shape[-1])
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"ssd_pallas: segment_ids must be [B, T]={q.shape[:2]}, got {segment_ids.shape}")
    runs = None if segment_ids is None else segment_runs(segment_ids, blocks.chunk)
    return _ssd(q, k, v, log_a, initial_state.astype(jnp.float32), runs, blocks, interpret)


def segment_runs(segment_ids: jax.Array, chunk: int) -> jax.Array:
    """``[B, T]`` segment ids -> ``[B, T']`` int32 (T' = T padded to whole chunks): the number of segment starts
    inside each token's chunk up to and including the token (0: still in the segment of the state entering the
    chunk). The padding has no starts, so it continues the last segment."""
    batch, length = segment_ids.shape
    pad = -length % chunk
    starts = jnp.pad(segment_starts(segment_ids, batch, length).astype(jnp.int32), ((0, 0), (0, pad)))  # [B, T']
    return jnp.cumsum(starts.reshape(batch, -1, chunk), axis=2).reshape(batch, length + pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _ssd(q, k, v, log_a, initial_state, runs, blocks, interpret):
    out, final_state, _ = _ssd_forward(q, k, v, log_a, initial_state, runs, blocks, interpret)
    return out, final_state


def _to_kernel_layout(x: jax.Array, pad: int, time_major: bool) -> jax.Array:
    """``[B, T, X, D] -> [B, T + pad, X, D]`` (time-major) or ``[B, X, T + pad, D]``, zero-padded in time."""
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return x if time_major else x.transpose(0, 2, 1, 3)


def _from_kernel_layout(x: jax.Array, length: int, time_major: bool) -> jax.Array:
    """Inverse of ``_to_kernel_layout``: back to ``[B, T, X, D]``, padding dropped."""
    return (x if time_major else x.transpose(0, 2, 1, 3))[:, :length]


def within_chunk_cumsum(log_a: jax.Array, chunk: int, pad: int) -> jax.Array:
    """Within-chunk cumulative log gates ``[B, T, H] -> [B, H, T + pad]`` float32 (padding: ``log_a = 0``)."""
    log_a = jnp.pad(log_a.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))  # [B, T', H]
    batch, padded, heads = log_a.shape
    cum = jnp.cumsum(log_a.reshape(batch, padded // chunk, chunk, heads), axis=2)
    return cum.reshape(batch, padded, heads).transpose(0, 2, 1)


def _ssd_forward(q, k, v, log_a, initial_state, runs, blocks, interpret):
    """Pad T to whole chunks (``log_a = 0``, ``k = v = 0`` leave the state unchanged), go head-major, run.
    Returns the output, the final state and the states entering every chunk. ``runs``: ``segment_runs`` or None."""
    length, chunk = q.shape[1], blocks.chunk
    pad = -length % chunk
    cum = within_chunk_cumsum(log_a, chunk, pad)  # [B, H, T']
    layout = dict(time_major=blocks.time_major, interpret=interpret, runs=runs)
    q_l, k_l, v_l = (_to_kernel_layout(x, pad, blocks.time_major) for x in (q, k, v))
    states, final_state = chunk_states(k_l, v_l, cum, initial_state, chunk=chunk, value_block=blocks.value_block,
                                       key_block=blocks.key_block, num_warps=blocks.state_num_warps,
                                       num_stages=blocks.state_num_stages, **layout)  # [B, H, N, K, V], [B, H, K, V]
    out = chunk_outputs(q_l, k_l, v_l, cum, states, chunk=chunk, value_block=blocks.output_value_block,
                        num_warps=blocks.num_warps, **layout)
    return _from_kernel_layout(out, length, blocks.time_major), final_state, states


def _ssd_fwd_rule(q, k, v, log_a, initial_state, runs, blocks, interpret):
    out, final_state, states = _ssd_forward(q, k, v, log_a, initial_state, runs, blocks, interpret)
    return (out, final_state), (q, k, v, log_a, runs, states, final_state)


def _ssd_bwd_rule(blocks, interpret, residuals, cotangents):
    """Gradients of every input from the kernels of ``kernel_bwd`` (module docstring); none for the runs."""
    q, k, v, log_a, runs, states, final_state = residuals
    dout, dfinal = cotangents
    length, chunk = q.shape[1], blocks.chunk
    pad = -length % chunk
    cum = within_chunk_cumsum(log_a, chunk, pad)  # [B, H, T']
    layout = dict(time_major=blocks.time_major, interpret=interpret, runs=runs)
    q_l, k_l, v_l, dout_l = (_to_kernel_layout(x, pad, blocks.time_major)
                             for x in (q, k, v, dout.astype(v.dtype)))
    dstates, dinitial = chunk_state_grads(q_l, dout_l, cum, dfinal.astype(jnp.float32), chunk=chunk,
                                          value_block=blocks.value_block, key_block=blocks.key_block,
                                          num_warps=blocks.state_num_warps, num_stages=blocks.state_num_stages,
                                          **layout)  # [B, H, N, K, V], [B, H, K, V]
    dq, dk, dv, gate = chunk_grads(q_l, k_l, v_l, dout_l, cum, states, dstates, chunk=chunk,
                                   num_warps=blocks.num_warps, **layout)  # gate [B, H, T']
    final_term = jnp.sum(dfinal.astype(jnp.float32) * final_state, axis=(2, 3))  # [B, H]
    dlog_a = jnp.flip(jnp.cumsum(jnp.flip(gate, axis=2), axis=2), axis=2) + final_term[:, :, None]  # [B, H, T']
    dq, dk, dv = (_from_kernel_layout(x, length, blocks.time_major) for x in (dq, dk, dv))
    return dq, dk, dv, dlog_a.transpose(0, 2, 1)[:, :length].astype(log_a.dtype), dinitial, None


_ssd.defvjp(_ssd_fwd_rule, _ssd_bwd_rule)
