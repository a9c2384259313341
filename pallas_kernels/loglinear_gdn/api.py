"""``loglinear_gated_delta_rule_pallas``: log-linear Gated DeltaNet (``jaxlm.ops.loglinear_gated_delta_rule``
semantics) on the Pallas kernels, as a ``jax.custom_vjp``.

Forward: ``pallas_kernels.gdn.kernel_ut`` (UT transform of every chunk, in parallel, keeping the UT inverses),
then ``kernel_fwd.level_states`` (one sequential pass over the chunks with the Fenwick level stack on chip, every
level carried through every chunk's delta-rule transition) and ``kernel_fwd.chunk_outputs`` (all chunks in
parallel). Backward (``blocks.backward``): ``"kernels"`` (``backward.kernel_backward``: the reverse
level-cotangent and level-read kernels of ``kernel_bwd`` on the stored level states, then the per-chunk gradient
kernel of ``kernel_chunk_bwd``; it keeps the level states ``[B, H, N, Lc, K, V]``, ``W``, ``K̃``, ``Q̂``, the UT
inverses and the gates from the forward), ``"chunk_vjp"`` (the same with the per-chunk gradients from the XLA
VJP of ``backward.chunk_map``) or ``"reference"`` (the VJP of the XLA chunked form, ``impl="chunked"`` with the
same chunk, recomputed from the inputs). All are exact (float32 inputs: float32 products). Segment ids are not
supported by the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.delta_rule_chunked import pad_time
from pallas_kernels.gdn.api import within_chunk_gates
from pallas_kernels.gdn.kernel_ut import ut_transform
from pallas_kernels.loglinear_gdn.backward import Saved, chunk_levels, kernel_backward
from pallas_kernels.loglinear_gdn.blocks import LogLinearGDNBlocks, check_blocks, loglinear_gdn_blocks
from pallas_kernels.loglinear_gdn.kernel_fwd import chunk_outputs, level_states
from pallas_kernels.loglinear_gdn.level_inputs import level_rows


def loglinear_gated_delta_rule_pallas(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array,
                                      lam: jax.Array, chunk_size: int | None = None, *,
                                      blocks: LogLinearGDNBlocks | None = None, segment_ids: jax.Array | None = None,
                                      interpret=None) -> jax.Array:
    """``o_t = Σ_{s≤t} λ_t^{level(t,s)} (q_tᵀ A_t … A_{s+1} β_s k_s) v_s``, ``A_r = a_r (I − β_r k_r k_rᵀ)``,
    ``a_r = exp(log_a_r)``, on the kernels.

    ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a, beta [B, T, H]``, ``lam [B, T, H, L]`` (column ℓ weights
    level ℓ; missing columns count as 0, extra ones are ignored) -> ``o [B, T, H, V]`` in v's dtype. ``blocks``
    overrides the per-backend ``loglinear_gdn_blocks(K, V, chunk_size)``; ``interpret`` the interpret mode (None:
    interpret on a CPU backend). Raises ``UnsupportedShapeError`` for head dims or chunks the kernels do not
    tile, ``ValueError`` for ``segment_ids`` (packed sequences need ``impl="chunked"``) or an unknown
    ``blocks.backward`` / ``blocks.grad_float32_dots``.
    """
    if segment_ids is not None:
        raise ValueError("loglinear_gated_delta_rule pallas kernel: segment_ids are not supported; use "
                         "impl='chunked' (or 'auto') for packed sequences")
    if blocks is None:
        blocks = loglinear_gdn_blocks(q.shape[-1], v.shape[-1], chunk_size)
    check_blocks(blocks, q.shape[-1], v.shape[-1])
    return _loglinear_gdn(q, k, v, log_a, beta, lam, blocks, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _loglinear_gdn(q, k, v, log_a, beta, lam, blocks, interpret):
    return _forward(q, k, v, log_a, beta, lam, blocks, interpret, for_backward=False)[0]


def _forward(q, k, v, log_a, beta, lam, blocks, interpret, *, for_backward: bool):
    """Pad T to whole chunks (``q = k = v = 0``, ``log_a = 0``, ``β = 0``, ``λ = 0``: the padding neither decays,
    rotates, writes nor is read), run the kernels, drop the padding. Returns (``o``, and ``for_backward`` what the
    kernel backward reuses: ``backward.Saved``, padded, time-major; else None)."""
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    q_p, k_p, v_p = (pad_time(x, padding) for x in (q, k, v))  # [B, T', G|H, D]
    beta_p = pad_time(beta.astype(jnp.float32), padding)  # [B, T', H]
    cum = within_chunk_gates(log_a, chunk, padding)  # [B, T', H]
    w, u0, decayed_keys, inverse = ut_transform(
        k_p, v_p, beta_p, cum, chunk=chunk, sub_block=blocks.sub_block, num_warps=blocks.transform_warps,
        store_inverse=True, interpret=interpret)  # [B, T', H, K|V|K|C]
    in_chunk, cross = chunk_levels(length, chunk)
    states = level_states(w, u0, decayed_keys, cum, chunk=chunk, value_block=blocks.state_value_block,
                          state_dtype=q.dtype, num_warps=blocks.state_warps,
                          interpret=interpret)  # [B, H, N, Lc, K, V]
    outputs = chunk_outputs(q_p, k_p, v_p, w, inverse, beta_p, cum, level_rows(lam, padding, in_chunk + cross),
                            states, chunk=chunk, in_chunk_levels=in_chunk, cross_levels=cross,
                            value_block=blocks.output_value_block, store_read_queries=for_backward,
                            num_warps=blocks.output_warps, interpret=interpret)  # [B, T', H, V] (, Q̂ [B, T', H, K])
    if not for_backward:
        return outputs[:, :length], None
    out, read_queries = outputs
    return out[:, :length], Saved(w, decayed_keys, cum, beta_p, inverse, read_queries, states)


def _fwd_rule(q, k, v, log_a, beta, lam, blocks, interpret):
    out, saved = _forward(q, k, v, log_a, beta, lam, blocks, interpret, for_backward=blocks.backward != "reference")
    return out, ((q, k, v, log_a, beta, lam), saved)


def _bwd_rule(blocks, interpret, residuals, d_out):
    inputs, saved = residuals
    if blocks.backward == "reference":
        return _reference_backward(blocks, inputs, d_out)
    return kernel_backward(blocks, interpret, inputs, saved, d_out)


def _reference_backward(blocks, inputs, d_out):
    """The VJP of the XLA chunked form recomputed from the inputs (float32 inputs: float32 products)."""
    from jaxlm.ops.loglinear import loglinear_gated_delta_rule  # the XLA reference lives in jaxlm: imported lazily

    def reference(q, k, v, log_a, beta, lam):
        return loglinear_gated_delta_rule(q, k, v, log_a, beta, lam, impl="chunked", chunk_size=blocks.chunk)

    precision = "float32" if inputs[2].dtype == jnp.float32 else None
    with jax.default_matmul_precision(precision):
        _, vjp = jax.vjp(reference, *inputs)
        return vjp(d_out.astype(inputs[2].dtype))


_loglinear_gdn.defvjp(_fwd_rule, _bwd_rule)
