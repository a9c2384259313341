"""``gated_delta_rule_pallas``: the gated delta rule (``jaxlm.ops.gated_delta_rule`` semantics) on the Pallas
kernels, as a ``jax.custom_vjp``.

Forward: ``kernel_ut`` (UT transform of every chunk, in parallel), then ``kernel_fwd`` (sequential chunk
states and pseudo-values, then parallel chunk outputs). Backward (``blocks.backward``): ``"kernels"`` runs the
reverse state-cotangent kernel of ``kernel_bwd`` on the forward's stored states, then the per-chunk gradient
kernel of ``kernel_chunk_bwd`` (all chunks in parallel) and, for grouped heads, sums ``dq, dk`` over each group's
heads; ``"chunk_vjp"`` takes the per-chunk gradients from the XLA VJP of ``chunk_local`` instead; ``"reference"``
is the VJP of the XLA chunked form recomputed from the inputs. All are exact (the kernel backwards read the
entering states, pseudo-values and leaving-state cotangents in the inputs' dtype, so bf16 for bf16 inputs).
``"kernels"`` keeps the entering states ``[B, H, T/C, K, V]``, the pseudo-values ``U`` ``[B, T, H, V]``, ``W``,
``K̃`` ``[B, T, H, K]``, the UT inverses ``X`` ``[B, T, H, C]`` float32 and the gates for the backward.

Packed sequences (``segment_ids``): the state resets to zero where the id changes. A reset at token t is the
recurrence with ``a_t = 0``; every kernel takes the within-chunk segment runs (``pallas_kernels.ssd.api.
segment_runs``) and masks the decay factors of the WY/UT form with them (``pallas_kernels.ssd.common``): the pair
decays ``Γ`` (in ``L``, ``A`` and the gradients) within a segment, the state read ``γ`` (in ``W`` and ``Q ⊙ γ``)
before the chunk's first start, the state write ``exp(g_C − g)`` (``K̃``) in the chunk's last segment and the
carry ``γ_C`` without a start in the chunk. These are the ``a_t → 0`` limits of the unmasked factors, so the
forward and both kernel backwards stay exact (``kernel_ut``: ``X`` is block diagonal over the segments, and the
tokens after a start never read the entering state through ``W S``). ``"chunk_vjp"`` masks ``chunk_local`` the
same way; ``"reference"`` passes the ids to the XLA chunked form. Without segment ids no mask is traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gdn.blocks import BACKWARDS, GDNBlocks, gdn_blocks
from pallas_kernels.gdn.chunk_local import chunk_local_outputs
from pallas_kernels.gdn.float32_dots import FLOAT32_DOTS
from pallas_kernels.gdn.kernel_bwd import state_cotangents
from pallas_kernels.gdn.kernel_chunk_bwd import chunk_grads
from pallas_kernels.gdn.kernel_fwd import chunk_outputs, chunk_states
from pallas_kernels.gdn.kernel_ut import ut_transform
from pallas_kernels.registry import UnsupportedShapeError
from pallas_kernels.ssd.api import segment_runs

from jaxlm.ops.delta_rule_chunked import pad_time, segment_starts


def gated_delta_rule_pallas(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array,
                            initial_state: jax.Array, chunk_size: int | None = None, *,
                            segment_ids: jax.Array | None = None,
                            blocks: GDNBlocks | None = None) -> tuple[jax.Array, jax.Array]:
    """``S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` on the kernels.

    ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a, beta [B, T, H]``, ``initial_state [B, H, K, V]`` ->
    (``o [B, T, H, V]`` in ``v``'s dtype, final state ``[B, H, K, V]`` float32). ``segment_ids [B, T]`` int:
    packed sequences, the state resets to zero where the id differs from the previous token's (``initial_state``
    belongs to token 0's segment); None: one sequence per row. ``blocks`` overrides the per-backend
    ``gdn_blocks(K, V, chunk_size)`` (for tuning). Raises ``UnsupportedShapeError`` for head dims, chunk sizes or
    value blocks the kernels do not tile, ValueError for ``segment_ids`` of another shape than ``[B, T]``.
    """
    default = gdn_blocks(q.shape[-1], v.shape[-1], chunk_size if blocks is None else blocks.chunk)
    blocks = default if blocks is None else blocks
    for name in ("state_value_block", "output_value_block", "grad_value_block"):
        size = getattr(blocks, name) or v.shape[-1]
        if size < 16 or v.shape[-1] % size:
            raise UnsupportedShapeError(f"gated_delta_rule pallas kernel: {name}={size} must be >= 16 and divide "
                                        f"value_dim={v.shape[-1]}")
    for name in ("transform_float32_dots", "grad_float32_dots"):
        if getattr(blocks, name) not in FLOAT32_DOTS:
            raise ValueError(f"gated_delta_rule pallas kernel: {name}={getattr(blocks, name)!r} must be one of "
                             f"{FLOAT32_DOTS}")
    if blocks.backward not in BACKWARDS:
        raise ValueError(f"gated_delta_rule pallas kernel: backward={blocks.backward!r} must be one of {BACKWARDS}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"gated_delta_rule pallas kernel: segment_ids must be [B, T]={q.shape[:2]}, "
                         f"got {segment_ids.shape}")
    return _gdn(q, k, v, log_a, beta, initial_state.astype(jnp.float32), segment_ids, blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gdn(q, k, v, log_a, beta, initial_state, segment_ids, blocks):
    return _gdn_forward(q, k, v, log_a, beta, initial_state, blocks, store_inverse=False,
                        segment_ids=segment_ids)[0]


def within_chunk_gates(log_a: jax.Array, chunk: int, padding: int) -> jax.Array:
    """``g``: inclusive cumulative sums of ``log_a [B, T, H]`` within each chunk, padded: ``[B, T', H]`` float32."""
    log_a = pad_time(log_a.astype(jnp.float32), padding)  # [B, T', H]
    batch, padded, heads = log_a.shape
    return jnp.cumsum(log_a.reshape(batch, padded // chunk, chunk, heads), axis=2).reshape(batch, padded, heads)


def _gdn_forward(q, k, v, log_a, beta, initial_state, blocks, *, store_inverse: bool,
                 segment_ids: jax.Array | None = None):
    """Pad T to whole chunks (``log_a = 0``, ``β = 0``, zero q/k/v leave the state unchanged; the padding
    continues the last segment), run the kernels.

    Returns ((``o``, final state), what the backward kernels reuse: entering states, ``W``, ``K̃``, ``g``, the
    pseudo-values ``U`` and, with ``store_inverse``, the UT inverses ``X``).
    """
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    runs = _runs(segment_ids, chunk)  # [B, T'] int32 or None
    q, k, v = (pad_time(x, padding) for x in (q, k, v))  # [B, T', G|H, D]
    beta = pad_time(beta.astype(jnp.float32), padding)  # [B, T', H]
    cum = within_chunk_gates(log_a, chunk, padding)  # [B, T', H]
    w, u0, decayed_keys, *inverse = ut_transform(
        k, v, beta, cum, chunk=chunk, sub_block=blocks.sub_block, num_warps=blocks.transform_warps,
        store_inverse=store_inverse, float32_dots=blocks.transform_float32_dots,
        runs=runs)  # [B, T', H, K|V|K], [X [B, T', H, C]]
    states, pseudo, final_state = chunk_states(w, u0, decayed_keys, cum, initial_state, chunk=chunk,
                                               value_block=blocks.state_value_block, state_dtype=q.dtype,
                                               num_warps=blocks.state_warps, num_stages=blocks.state_stages,
                                               runs=runs)
    out = chunk_outputs(q, k, pseudo, cum, states, chunk=chunk, value_block=blocks.output_value_block,
                        num_warps=blocks.output_warps, runs=runs)  # [B, T', H, V]
    return (out[:, :length], final_state), (states, w, decayed_keys, cum, pseudo, *inverse)


def _runs(segment_ids: jax.Array | None, chunk: int) -> jax.Array | None:
    """The kernels' segment runs ``[B, T']`` int32 (``segment_runs``), None without segment ids."""
    return None if segment_ids is None else segment_runs(segment_ids, chunk)


def _gdn_fwd_rule(q, k, v, log_a, beta, initial_state, segment_ids, blocks):
    outputs, kernel_residuals = _gdn_forward(q, k, v, log_a, beta, initial_state, blocks,
                                             store_inverse=blocks.backward == "kernels", segment_ids=segment_ids)
    if blocks.backward == "reference":
        kernel_residuals = None
    return outputs, ((q, k, v, log_a, beta, initial_state, segment_ids), kernel_residuals)


def _gdn_bwd_rule(blocks, residuals, cotangents):
    """Gradients of the six differentiable inputs; none for the segment ids."""
    inputs, kernel_residuals = residuals
    if blocks.backward == "reference":
        return (*_reference_backward(blocks, inputs, cotangents), None)
    d_leaving, d_initial = _leaving_state_cotangents(blocks, inputs, kernel_residuals, cotangents)
    per_chunk = _chunk_kernel_backward if blocks.backward == "kernels" else _chunk_vjp_backward
    return (*per_chunk(blocks, inputs, kernel_residuals, cotangents[0], d_leaving),
            d_initial.astype(inputs[5].dtype), None)


def _leaving_state_cotangents(blocks, inputs, kernel_residuals, cotangents):
    """The reverse state-cotangent kernel: (``dS`` leaving every chunk ``[B, H, N, K, V]`` in q's dtype,
    ``dS_0 [B, H, K, V]`` float32)."""
    q, k, segment_ids = inputs[0], inputs[1], inputs[6]
    _, w, decayed_keys, cum = kernel_residuals[:4]
    d_out, d_final = cotangents
    padding = -q.shape[1] % blocks.chunk
    return state_cotangents(
        pad_time(q, padding), pad_time(k, padding), cum, w, decayed_keys, pad_time(d_out, padding),
        d_final.astype(jnp.float32), chunk=blocks.chunk, value_block=blocks.state_value_block,
        num_warps=blocks.state_warps, num_stages=blocks.state_stages, cotangent_dtype=q.dtype,
        runs=_runs(segment_ids, blocks.chunk))


def _chunk_kernel_backward(blocks, inputs, kernel_residuals, d_out, d_leaving):
    """``(dq, dk, dv, d log_a, dβ)`` from the per-chunk gradient kernel; ``dq, dk`` summed over each group."""
    q, k, v, log_a, beta, _, segment_ids = inputs
    states, _, _, cum, pseudo, inverse = kernel_residuals
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    dq, dk, dv, d_beta, d_log_a = chunk_grads(
        pad_time(q, padding), pad_time(k, padding), pad_time(v, padding), pseudo, pad_time(d_out, padding),
        pad_time(beta.astype(jnp.float32), padding), cum, inverse, states, d_leaving, chunk=chunk,
        value_block=blocks.grad_value_block or v.shape[-1], float32_dots=blocks.grad_float32_dots,
        num_warps=blocks.grad_warps, runs=_runs(segment_ids, chunk))
    dq, dk = (sum_over_group(x[:, :length], q.shape[2]).astype(q.dtype) for x in (dq, dk))  # [B, T, G, K]
    return (dq, dk, dv[:, :length], d_log_a[:, :length].astype(log_a.dtype), d_beta[:, :length].astype(beta.dtype))


def sum_over_group(per_head: jax.Array, groups: int) -> jax.Array:
    """``[B, T, H, K] -> [B, T, G, K]``: the sum over the heads ``h`` of each group ``h // (H // G)``."""
    batch, length, heads, key_dim = per_head.shape
    if heads == groups:
        return per_head
    return per_head.reshape(batch, length, groups, heads // groups, key_dim).sum(axis=3)


def _chunk_vjp_backward(blocks, inputs, kernel_residuals, d_out, d_leaving):
    """``(dq, dk, dv, d log_a, dβ)`` as the XLA VJP of ``chunk_local_outputs``."""
    segment_ids = inputs[6]
    starts = None if segment_ids is None else segment_starts(segment_ids, *segment_ids.shape)  # [B, T]
    per_chunk = functools.partial(chunk_local_outputs, chunk=blocks.chunk, starts=starts)
    _, vjp = jax.vjp(lambda *x: per_chunk(*x, kernel_residuals[0]), *inputs[:5])
    return vjp((d_out.astype(jnp.float32), d_leaving.astype(jnp.float32)))


def _reference_backward(blocks, inputs, cotangents):
    """The VJP of the XLA chunked form recomputed from the inputs (segment ids passed through)."""
    from jaxlm.ops.delta_rule import gated_delta_rule  # the XLA reference lives in jaxlm: imported lazily

    def reference(q, k, v, log_a, beta, initial_state):
        return gated_delta_rule(q, k, v, log_a, beta, initial_state=initial_state, return_final_state=True,
                                impl="chunked", chunk_size=blocks.chunk, segment_ids=inputs[6])

    _, vjp = jax.vjp(reference, *inputs[:6])
    return vjp(cotangents)


_gdn.defvjp(_gdn_fwd_rule, _gdn_bwd_rule)
