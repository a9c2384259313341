"""``gated_delta_rule_pallas``: the gated delta rule (``jaxlm.ops.gated_delta_rule`` semantics) on the Pallas
kernels, as a ``jax.custom_vjp``.

Forward: ``kernel_ut`` (UT transform of every chunk, in parallel), then ``kernel_fwd`` (sequential chunk
states and pseudo-values, then parallel chunk outputs). Backward (``blocks.backward``): ``"kernels"`` runs the
reverse state-cotangent kernel of ``kernel_bwd`` on the forward's stored states, then the per-chunk gradients
as the VJP of ``chunk_local`` (XLA, all chunks at once, no scan); ``"reference"`` is the VJP of the XLA chunked
form recomputed from the inputs. Both are exact (``"kernels"`` reads the entering states as the forward stored
them: in the inputs' dtype, so bf16 for bf16 inputs); ``"kernels"`` keeps the entering states
``[B, H, T/C, K, V]``, ``W``, ``K̃`` ``[B, T, H, K]`` and the gates for the backward. Segment ids are not supported
by the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gdn.blocks import BACKWARDS, GDNBlocks, gdn_blocks
from pallas_kernels.gdn.chunk_local import chunk_local_outputs
from pallas_kernels.gdn.kernel_bwd import state_cotangents
from pallas_kernels.gdn.kernel_fwd import chunk_outputs, chunk_states
from pallas_kernels.gdn.kernel_ut import ut_transform
from pallas_kernels.registry import UnsupportedShapeError

from jaxlm.ops.delta_rule_chunked import pad_time


def gated_delta_rule_pallas(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array,
                            initial_state: jax.Array, chunk_size: int | None = None, *,
                            blocks: GDNBlocks | None = None) -> tuple[jax.Array, jax.Array]:
    """``S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` on the kernels.

    ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a, beta [B, T, H]``, ``initial_state [B, H, K, V]`` ->
    (``o [B, T, H, V]`` in ``v``'s dtype, final state ``[B, H, K, V]`` float32). ``blocks`` overrides the
    per-backend ``gdn_blocks(K, V, chunk_size)`` (for tuning). Raises ``UnsupportedShapeError`` for head dims,
    chunk sizes or value blocks the kernels do not tile.
    """
    default = gdn_blocks(q.shape[-1], v.shape[-1], chunk_size if blocks is None else blocks.chunk)
    blocks = default if blocks is None else blocks
    for name in ("state_value_block", "output_value_block"):
        size = getattr(blocks, name)
        if size < 16 or v.shape[-1] % size:
            raise UnsupportedShapeError(f"gated_delta_rule pallas kernel: {name}={size} must be >= 16 and divide "
                                        f"value_dim={v.shape[-1]}")
    if blocks.backward not in BACKWARDS:
        raise ValueError(f"gated_delta_rule pallas kernel: backward={blocks.backward!r} must be one of {BACKWARDS}")
    return _gdn(q, k, v, log_a, beta, initial_state.astype(jnp.float32), blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gdn(q, k, v, log_a, beta, initial_state, blocks):
    return _gdn_forward(q, k, v, log_a, beta, initial_state, blocks)[0]


def _within_chunk_gates(log_a: jax.Array, chunk: int, padding: int) -> jax.Array:
    """``g``: inclusive cumulative sums of ``log_a [B, T, H]`` within each chunk, padded: ``[B, T', H]`` float32."""
    log_a = pad_time(log_a.astype(jnp.float32), padding)  # [B, T', H]
    batch, padded, heads = log_a.shape
    return jnp.cumsum(log_a.reshape(batch, padded // chunk, chunk, heads), axis=2).reshape(batch, padded, heads)


def _gdn_forward(q, k, v, log_a, beta, initial_state, blocks):
    """Pad T to whole chunks (``log_a = 0``, ``β = 0``, zero q/k/v leave the state unchanged), run the kernels.

    Returns ((``o``, final state), (entering states, ``W``, ``K̃``, ``g``): what the backward kernels reuse).
    """
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    q, k, v = (pad_time(x, padding) for x in (q, k, v))  # [B, T', G|H, D]
    beta = pad_time(beta.astype(jnp.float32), padding)  # [B, T', H]
    cum = _within_chunk_gates(log_a, chunk, padding)  # [B, T', H]
    w, u0, decayed_keys = ut_transform(k, v, beta, cum, chunk=chunk, sub_block=blocks.sub_block,
                                       num_warps=blocks.transform_warps)  # [B, T', H, K|V|K]
    states, pseudo, final_state = chunk_states(w, u0, decayed_keys, cum, initial_state, chunk=chunk,
                                               value_block=blocks.state_value_block, state_dtype=q.dtype,
                                               num_warps=blocks.state_warps, num_stages=blocks.state_stages)
    out = chunk_outputs(q, k, pseudo, cum, states, chunk=chunk, value_block=blocks.output_value_block,
                        num_warps=blocks.output_warps)  # [B, T', H, V]
    return (out[:, :length], final_state), (states, w, decayed_keys, cum)


def _gdn_fwd_rule(q, k, v, log_a, beta, initial_state, blocks):
    outputs, kernel_residuals = _gdn_forward(q, k, v, log_a, beta, initial_state, blocks)
    if blocks.backward == "reference":
        kernel_residuals = None
    return outputs, ((q, k, v, log_a, beta, initial_state), kernel_residuals)


def _gdn_bwd_rule(blocks, residuals, cotangents):
    inputs, kernel_residuals = residuals
    if blocks.backward == "reference":
        return _reference_backward(blocks, inputs, cotangents)
    return _kernel_backward(blocks, inputs, kernel_residuals, cotangents)


def _kernel_backward(blocks, inputs, kernel_residuals, cotangents):
    """Reverse state-cotangent kernel, then the per-chunk gradients as the VJP of ``chunk_local_outputs``."""
    q, k, v, log_a, beta, initial_state = inputs
    states, w, decayed_keys, cum = kernel_residuals
    d_out, d_final = cotangents
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    d_leaving, d_initial = state_cotangents(
        pad_time(q, padding), pad_time(k, padding), cum, w, decayed_keys, pad_time(d_out, padding),
        d_final.astype(jnp.float32), chunk=chunk, value_block=blocks.state_value_block,
        num_warps=blocks.state_warps, num_stages=blocks.state_stages)  # [B, H, N, K, V], [B, H, K, V]
    per_chunk = functools.partial(chunk_local_outputs, chunk=chunk)
    _, vjp = jax.vjp(lambda *x: per_chunk(*x, states), q, k, v, log_a, beta)
    return (*vjp((d_out.astype(jnp.float32), d_leaving)), d_initial.astype(initial_state.dtype))


def _reference_backward(blocks, inputs, cotangents):
    """The VJP of the XLA chunked form recomputed from the inputs."""
    from jaxlm.ops.delta_rule import gated_delta_rule  # the XLA reference lives in jaxlm: imported lazily

    def reference(q, k, v, log_a, beta, initial_state):
        return gated_delta_rule(q, k, v, log_a, beta, initial_state=initial_state, return_final_state=True,
                                impl="chunked", chunk_size=blocks.chunk)

    _, vjp = jax.vjp(reference, *inputs)
    return vjp(cotangents)


_gdn.defvjp(_gdn_fwd_rule, _gdn_bwd_rule)
