"""``ssd_pallas``: the SSD op (``jaxlm.ops.ssd`` semantics) on the Pallas kernels, as a ``jax.custom_vjp``.

Forward: ``kernel_fwd`` (chunk states, then chunk outputs). Backward: for now the VJP of the XLA chunked
form recomputed from the inputs (``jaxlm.ops.ssd(impl="chunked")``), so gradients are exact; Pallas
backward kernels are the next step of this family. Segment ids are not supported by the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.blocks import ssd_blocks
from pallas_kernels.ssd.kernel_fwd import chunk_outputs, chunk_states


def ssd_pallas(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, initial_state: jax.Array,
               chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``S_t = a_t S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` on the kernels.

    ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a [B, T, H]``, ``initial_state [B, H, K, V]`` ->
    (``o [B, T, H, V]`` in ``v``'s dtype, final state ``[B, H, K, V]`` float32). Raises
    ``UnsupportedShapeError`` for head dims the kernels do not tile.
    """
    blocks = ssd_blocks(q.shape[-1], v.shape[-1], chunk_size)
    return _ssd(q, k, v, log_a, initial_state.astype(jnp.float32), blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ssd(q, k, v, log_a, initial_state, blocks):
    return _ssd_forward(q, k, v, log_a, initial_state, blocks)


def _ssd_forward(q, k, v, log_a, initial_state, blocks):
    """Pad T to whole chunks (``log_a = 0``, ``k = v = 0`` leave the state unchanged), go head-major, run."""
    length, chunk = q.shape[1], blocks.chunk
    pad = -length % chunk

    def head_major(x):  # [B, T, X, D] -> [B, X, T + pad, D]
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    log_a = jnp.pad(log_a.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))  # [B, T', H]
    batch, padded, heads = log_a.shape
    cum = jnp.cumsum(log_a.reshape(batch, padded // chunk, chunk, heads), axis=2)  # within-chunk sums
    cum = cum.reshape(batch, padded, heads).transpose(0, 2, 1)  # [B, H, T']
    q_h, k_h, v_h = head_major(q), head_major(k), head_major(v)
    states, final_state = chunk_states(k_h, v_h, cum, initial_state, chunk=chunk, value_block=blocks.value_block,
                                       key_block=blocks.key_block)  # [B, H, N, K, V], [B, H, K, V]
    out = chunk_outputs(q_h, k_h, v_h, cum, states, chunk=chunk, value_block=blocks.value_block)  # [B, H, T', V]
    return out.transpose(0, 2, 1, 3)[:, :length], final_state


def _ssd_fwd_rule(q, k, v, log_a, initial_state, blocks):
    return _ssd_forward(q, k, v, log_a, initial_state, blocks), (q, k, v, log_a, initial_state)


def _ssd_bwd_rule(blocks, residuals, cotangents):
    from jaxlm.ops.ssd import ssd  # the XLA reference lives in jaxlm; imported lazily to keep layers separate

    def reference(q, k, v, log_a, initial_state):
        return ssd(q, k, v, log_a, initial_state=initial_state, return_final_state=True, impl="chunked",
                   chunk_size=blocks.chunk)

    _, vjp = jax.vjp(reference, *residuals)
    return vjp(cotangents)


_ssd.defvjp(_ssd_fwd_rule, _ssd_bwd_rule)
