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
same chunk, recomputed from the inputs). All are exact (float32 inputs: float32 products). Packed sequences
(``segment_ids``) run on the segment row layout of ``pallas_kernels.loglinear.segments`` (the kernels take the
per-token ranks; the gathers into and out of the layout are differentiated by JAX).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.delta_rule_chunked import pad_time
from pallas_kernels.gdn.api import within_chunk_gates
from pallas_kernels.gdn.kernel_ut import ut_transform
from pallas_kernels.loglinear.segments import all_level_columns, on_segment_rows, row_segment_ids
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
    interpret on a CPU backend). ``segment_ids [B, T]``: packed sequences (positions restart where the id
    changes) on the segment row layout (rows whose segments average fewer than C tokens take the chunked XLA
    path). Raises ``UnsupportedShapeError`` for head dims or chunks the kernels do not tile, ``ValueError`` for
    ``segment_ids`` of another shape than ``[B, T]`` or an unknown ``blocks.backward`` / ``blocks.grad_float32_dots``.
    """
    if blocks is None:
        blocks = loglinear_gdn_blocks(q.shape[-1], v.shape[-1], chunk_size)
    check_blocks(blocks, q.shape[-1], v.shape[-1])
    if segment_ids is None:
        return _loglinear_gdn(q, k, v, log_a, beta, lam, None, blocks, interpret, None)
    rank_chunks = -(-q.shape[1] // blocks.chunk)

    def kernels(q, k, v, log_a, beta, lam, ranks):
        return _loglinear_gdn(q, k, v, log_a, beta, lam, ranks, blocks, interpret, rank_chunks)

    def chunked(q, k, v, log_a, beta, lam, segment_ids):
        from jaxlm.ops.loglinear import loglinear_gated_delta_rule  # the XLA path lives in jaxlm: imported lazily

        return loglinear_gated_delta_rule(q, k, v, log_a, beta, all_level_columns(lam, q.shape[1]), impl="chunked",
                                          chunk_size=blocks.chunk, segment_ids=segment_ids)

    return on_segment_rows("loglinear_gated_delta_rule_pallas", kernels, chunked, (q, k, v, log_a, beta, lam),
                           segment_ids, blocks.chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _loglinear_gdn(q, k, v, log_a, beta, lam, ranks, blocks, interpret, rank_chunks):
    return _forward(q, k, v, log_a, beta, lam, ranks, blocks, interpret, rank_chunks, for_backward=False)[0]


def _forward(q, k, v, log_a, beta, lam, ranks, blocks, interpret, rank_chunks, *, for_backward: bool):
    """Pad T to whole chunks (``q = k = v = 0``, ``log_a = 0``, ``β = 0``, ``λ = 0``: the padding neither decays,
    rotates, writes nor is read), run the kernels, drop the padding. Returns (``o``, and ``for_backward`` what the
    kernel backward reuses: ``backward.Saved``, padded, time-major; else None). ``ranks [B, T]`` (the segment row
    layout, T whole chunks) or None; ``rank_chunks`` the most chunks one segment spans (None: all)."""
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    q_p, k_p, v_p = (pad_time(x, padding) for x in (q, k, v))  # [B, T', G|H, D]
    beta_p = pad_time(beta.astype(jnp.float32), padding)  # [B, T', H]
    cum = within_chunk_gates(log_a, chunk, padding)  # [B, T', H]
    w, u0, decayed_keys, inverse = ut_transform(
        k_p, v_p, beta_p, cum, chunk=chunk, sub_block=blocks.sub_block, num_warps=blocks.transform_warps,
        store_inverse=True, interpret=interpret)  # [B, T', H, K|V|K|C]
    in_chunk, cross = chunk_levels(length, chunk, rank_chunks)
    states = level_states(w, u0, decayed_keys, cum, chunk=chunk, value_block=blocks.state_value_block,
                          state_dtype=q.dtype, num_warps=blocks.state_warps, ranks=ranks, rank_chunks=rank_chunks,
                          interpret=interpret)  # [B, H, N, Lc, K, V]
    outputs = chunk_outputs(q_p, k_p, v_p, w, inverse, beta_p, cum, level_rows(lam, padding, in_chunk + cross),
                            states, chunk=chunk, in_chunk_levels=in_chunk, cross_levels=cross,
                            value_block=blocks.output_value_block, store_read_queries=for_backward,
                            num_warps=blocks.output_warps, ranks=ranks,
                            interpret=interpret)  # [B, T', H, V] (, Q̂ [B, T', H, K])
    if not for_backward:
        return outputs[:, :length], None
    out, read_queries = outputs
    return out[:, :length], Saved(w, decayed_keys, cum, beta_p, inverse, read_queries, states, ranks)


def _fwd_rule(q, k, v, log_a, beta, lam, ranks, blocks, interpret, rank_chunks):
    out, saved = _forward(q, k, v, log_a, beta, lam, ranks, blocks, interpret, rank_chunks,
                          for_backward=blocks.backward != "reference")
    return out, ((q, k, v, log_a, beta, lam), ranks, saved)


def _bwd_rule(blocks, interpret, rank_chunks, residuals, d_out):
    inputs, ranks, saved = residuals
    if blocks.backward == "reference":
        return (*_reference_backward(blocks, inputs, ranks, d_out), None)
    return (*kernel_backward(blocks, interpret, inputs, saved, d_out, rank_chunks), None)


def _reference_backward(blocks, inputs, ranks, d_out):
    """The VJP of the XLA chunked form recomputed from the inputs (float32 inputs: float32 products); on the
    segment row layout with its segment ids."""
    from jaxlm.ops.loglinear import loglinear_gated_delta_rule  # the XLA reference lives in jaxlm: imported lazily

    segment_ids = None if ranks is None else row_segment_ids(ranks, blocks.chunk)

    def reference(q, k, v, log_a, beta, lam):
        return loglinear_gated_delta_rule(q, k, v, log_a, beta, all_level_columns(lam, q.shape[1]), impl="chunked",
                                          chunk_size=blocks.chunk, segment_ids=segment_ids)

    precision = "float32" if inputs[2].dtype == jnp.float32 else None
    with jax.default_matmul_precision(precision):
        _, vjp = jax.vjp(reference, *inputs)
        return vjp(d_out.astype(inputs[2].dtype))


_loglinear_gdn.defvjp(_fwd_rule, _bwd_rule)
