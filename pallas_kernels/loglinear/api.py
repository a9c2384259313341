"""``loglinear_ssd_pallas``: log-linear SSD (``jaxlm.ops.loglinear_ssd`` semantics) on the Pallas kernels, as a
``jax.custom_vjp``.

Forward: the gates and λ are laid out per level here (``level_inputs``), then ``kernel_fwd.level_states`` (one
sequential pass over the chunks with the Fenwick level stack on chip) and ``kernel_fwd.chunk_outputs`` (all
chunks in parallel); the boundary states are kept for the backward. Backward (``blocks.backward``):
``"kernels"`` runs ``kernel_bwd`` (the reverse level-cotangent pass, then every chunk's gradients in parallel);
the gate gradient is the reverse cumulative sum of the per-token ``q·dq − k·dk``, and λ's gradient is the VJP of
``level_inputs`` with respect to λ of the kernels' row cotangents. ``"reference"`` is the VJP of the XLA chunked
form (``impl="chunked"``, same chunk) recomputed from the inputs (float32 inputs: float32 products). Both are
exact. Packed sequences (``segment_ids``) run on the segment row layout of ``segments``: the kernels take the
per-token ranks, and the gathers into and out of the layout are differentiated by JAX.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.ops.delta_rule_chunked import pad_time
from pallas_kernels.loglinear.blocks import LogLinearBlocks, check_blocks, loglinear_blocks
from pallas_kernels.loglinear.kernel_bwd import chunk_grads, level_cotangents
from pallas_kernels.loglinear.kernel_fwd import chunk_outputs, level_states
from pallas_kernels.loglinear.segments import all_level_columns, on_segment_rows, row_segment_ids
from pallas_kernels.ssd.api import within_chunk_cumsum


def loglinear_ssd_pallas(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, lam: jax.Array,
                         chunk_size: int | None = None, *, blocks: LogLinearBlocks | None = None,
                         segment_ids: jax.Array | None = None, interpret=None) -> jax.Array:
    """``o_t = Σ_{s≤t} λ_t^{level(t,s)} exp(Σ_{r=s+1..t} log_a_r) (q_t·k_s) v_s`` on the kernels.

    ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a [B, T, H]``, ``lam [B, T, H, L]`` (column ℓ weights
    level ℓ; missing columns count as 0, extra ones are ignored) -> ``o [B, T, H, V]`` in ``v``'s dtype.
    ``blocks`` overrides the per-backend ``loglinear_blocks(K, V, chunk_size)``; ``interpret`` the interpret
    mode (None: interpret on a CPU backend). ``segment_ids [B, T]``: packed sequences (positions restart where
    the id changes), run on the segment row layout (``segments``; rows whose segments average fewer than C tokens
    take the chunked XLA path). Raises ``UnsupportedShapeError`` for head dims or chunks the kernels do not tile,
    ValueError for ``segment_ids`` of another shape than ``[B, T]``.
    """
    if blocks is None:
        blocks = loglinear_blocks(q.shape[-1], v.shape[-1], chunk_size)
    check_blocks(blocks, q.shape[-1], v.shape[-1])
    if segment_ids is None:
        return _loglinear_ssd(q, k, v, log_a, lam, None, blocks, interpret, None)
    rank_chunks = -(-q.shape[1] // blocks.chunk)

    def kernels(q, k, v, log_a, lam, ranks):
        return _loglinear_ssd(q, k, v, log_a, lam, ranks, blocks, interpret, rank_chunks)

    def chunked(q, k, v, log_a, lam, segment_ids):
        from jaxlm.ops.loglinear import loglinear_ssd  # the XLA path lives in jaxlm: imported lazily

        return loglinear_ssd(q, k, v, log_a, all_level_columns(lam, q.shape[1]), impl="chunked",
                             chunk_size=blocks.chunk, segment_ids=segment_ids)

    return on_segment_rows("loglinear_ssd_pallas", kernels, chunked, (q, k, v, log_a, lam), segment_ids,
                           blocks.chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _loglinear_ssd(q, k, v, log_a, lam, ranks, blocks, interpret, rank_chunks):
    return _forward(q, k, v, log_a, lam, ranks, blocks, interpret, rank_chunks)[0]


def _rows_to_power_of_two(x: jax.Array) -> jax.Array:
    """Zero rows appended on axis 2 of ``[B, H, R, T]`` up to a power of two (at least 1): Triton block dims."""
    rows = x.shape[2]
    target = 1 if rows <= 1 else 1 << (rows - 1).bit_length()
    return jnp.pad(x, ((0, 0), (0, 0), (0, target - rows), (0, 0)))


def _sum_since_block_start(x: jax.Array, ranks: jax.Array, span: int) -> jax.Array:
    """``y[n] = Σ_{m=n−(rank_n mod span)}^{n−1} x[m]`` on the last axis: exclusive sums within the aligned rank
    blocks ``[rank >> log2 span] ``. ``x [B, H, N]``, ``ranks [B, N]`` (consecutive within a segment; the chunk
    index for one sequence per row)."""
    starts = jnp.broadcast_to((ranks % span == 0)[:, None, :], x.shape)  # [B, H, N]

    def combine(left, right):
        (left_sum, left_start), (right_sum, right_start) = left, right
        return jnp.where(right_start, right_sum, left_sum + right_sum), left_start | right_start

    inclusive, _ = jax.lax.associative_scan(combine, (x, starts), axis=-1)
    previous = jnp.pad(inclusive, [(0, 0)] * (x.ndim - 1) + [(1, 0)])[..., :-1]
    return jnp.where(starts, 0.0, previous)


class LevelInputs(NamedTuple):
    """Per-level operands of the kernels, float32, T padded to ``T' = N·C``, rows padded to powers of two."""

    cum: jax.Array  # [B, H, T'] within-chunk cumulative log gates c
    lam_rows: jax.Array  # [B, H, R_in, T'] λ of the in-chunk levels 0 … log2 C
    read_rows: jax.Array  # [B, H, R_x, T'] r^{(j)}: read weights of the chunk levels
    bucket_rows: jax.Array  # [B, H, R_x, T'] u^{(j)}: the same without the carried decay
    in_chunk_levels: int  # log2 C + 1
    cross_levels: int  # chunk levels bit_length(N − 1)


def level_inputs(log_a: jax.Array, lam: jax.Array, chunk: int, padding: int, ranks: jax.Array | None = None,
                 rank_chunks: int | None = None) -> LevelInputs:
    """Per-level operands (``kernel_fwd`` / ``kernel_bwd`` docstrings), T padded by ``padding`` (``log_a = 0``,
    ``λ = 0``): ``u^{(j)}_t = [bit j of ρ_n] λ_t^{(log2 C + 1 + j)} exp(c_t)`` and
    ``r^{(j)}_t = u^{(j)}_t exp(Σ_{m=n−(ρ_n mod 2^j)}^{n−1} log_decay_m)`` (``log_decay_m = c_last`` of chunk m)
    with ``ρ_n`` the rank of chunk n (``ranks [B, T']`` per token, ``segments``; None: ``ρ_n = n``) and
    ``bit_length(rank_chunks − 1)`` chunk levels (None: ``rank_chunks = N``).
    """
    cum = within_chunk_cumsum(log_a, chunk, padding)  # [B, H, T']
    num_chunks = cum.shape[2] // chunk
    in_chunk, cross = chunk.bit_length(), ((rank_chunks or num_chunks) - 1).bit_length()
    if ranks is None:
        chunk_ranks = jnp.broadcast_to(jnp.arange(num_chunks, dtype=jnp.int32), (cum.shape[0], num_chunks))
    else:
        chunk_ranks = ranks[:, ::chunk]  # [B, N]
    needed = in_chunk + cross
    lam = pad_time(lam.astype(jnp.float32), padding)  # [B, T', H, L]
    lam = jnp.pad(lam, ((0, 0), (0, 0), (0, 0), (0, max(needed - lam.shape[-1], 0))))[..., :needed]
    lam = lam.transpose(0, 2, 3, 1)  # [B, H, L', T']
    chunk_log_decay = cum[..., chunk - 1::chunk]  # [B, H, N]
    bucket_rows, read_rows = [], []
    for level in range(cross):
        reads = jnp.bitwise_and(jnp.right_shift(chunk_ranks, level), 1) == 1  # [B, N]
        reads = jnp.repeat(reads, chunk, axis=-1)[:, None]  # [B, 1, T']
        bucket = lam[:, :, in_chunk + level] * jnp.exp(cum) * reads  # [B, H, T']
        carried = jnp.exp(_sum_since_block_start(chunk_log_decay, chunk_ranks, 1 << level))  # [B, H, N]
        bucket_rows.append(bucket)
        read_rows.append(bucket * jnp.repeat(carried, chunk, axis=-1))

    def stacked(rows):  # -> [B, H, R_x, T']
        return _rows_to_power_of_two(jnp.stack(rows, axis=2) if rows else jnp.zeros_like(cum)[:, :, None])

    return LevelInputs(cum, _rows_to_power_of_two(lam[:, :, :in_chunk]), stacked(read_rows), stacked(bucket_rows),
                       in_chunk, cross)


def _forward(q, k, v, log_a, lam, ranks, blocks, interpret, rank_chunks):
    """Pad T to whole chunks (``k = v = log_a = λ = 0``: the padding writes and reads nothing), run both
    kernels, drop the padding. Returns the output and the boundary states ``[B, H, N, K, V]``. ``ranks [B, T]``
    (the segment row layout, T whole chunks) or None; ``rank_chunks`` as in ``level_inputs``."""
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    levels = level_inputs(log_a, lam, chunk, padding, ranks, rank_chunks)
    q_p, k_p, v_p = (pad_time(x, padding) for x in (q, k, v))
    states = level_states(k_p, v_p, levels.cum, chunk=chunk, key_block=blocks.key_block,
                          value_block=blocks.value_block, num_warps=blocks.state_num_warps, ranks=ranks,
                          rank_chunks=rank_chunks, interpret=interpret)  # [B, H, N, K, V]
    out = chunk_outputs(q_p, k_p, v_p, levels.cum, levels.lam_rows, levels.read_rows, states, chunk=chunk,
                        in_chunk_levels=levels.in_chunk_levels, cross_levels=levels.cross_levels,
                        value_block=blocks.output_value_block, num_warps=blocks.num_warps, ranks=ranks,
                        interpret=interpret)  # [B, T', H, V]
    return out[:, :length], states


def _fwd_rule(q, k, v, log_a, lam, ranks, blocks, interpret, rank_chunks):
    out, states = _forward(q, k, v, log_a, lam, ranks, blocks, interpret, rank_chunks)
    return out, (q, k, v, log_a, lam, ranks, states)


def _bwd_rule(blocks, interpret, rank_chunks, residuals, d_out):
    if blocks.backward == "reference":
        grads = _reference_backward(blocks, residuals[:5], residuals[5], d_out)
    else:
        grads = _kernel_backward(blocks, interpret, rank_chunks, residuals, d_out)
    return (*grads, None)


def _kernel_backward(blocks, interpret, rank_chunks, residuals, d_out):
    """Gradients of every input from the kernels of ``kernel_bwd`` (module docstring)."""
    q, k, v, log_a, lam, ranks, states = residuals
    length, chunk = q.shape[1], blocks.chunk
    padding = -length % chunk
    levels = level_inputs(log_a, lam, chunk, padding, ranks, rank_chunks)
    q_p, k_p, v_p, dout_p = (pad_time(x, padding) for x in (q, k, v, d_out.astype(v.dtype)))
    dstates = level_cotangents(q_p, dout_p, levels.cum, levels.bucket_rows, chunk=chunk,
                               cross_levels=levels.cross_levels, key_block=blocks.key_block,
                               value_block=blocks.cotangent_value_block or blocks.value_block,
                               num_warps=blocks.state_num_warps, ranks=ranks,
                               interpret=interpret)  # [B, H, N, K, V]
    dq, dk, dv, gate, dlam_rows, dread_rows = chunk_grads(
        q_p, k_p, v_p, dout_p, levels.cum, levels.lam_rows, levels.read_rows, states, dstates, chunk=chunk,
        in_chunk_levels=levels.in_chunk_levels, cross_levels=levels.cross_levels, num_warps=blocks.grad_num_warps,
        ranks=ranks, interpret=interpret)
    dlog_a = jnp.flip(jnp.cumsum(jnp.flip(gate, axis=2), axis=2), axis=2)  # [B, H, T']

    def level_rows(lam):
        inputs = level_inputs(log_a, lam, chunk, padding, ranks, rank_chunks)
        return inputs.lam_rows, inputs.read_rows

    _, lam_vjp = jax.vjp(level_rows, lam)
    (dlam,) = lam_vjp((dlam_rows, dread_rows))
    return (dq[:, :length], dk[:, :length], dv[:, :length],
            dlog_a.transpose(0, 2, 1)[:, :length].astype(log_a.dtype), dlam.astype(lam.dtype))


def _reference_backward(blocks, inputs, ranks, d_out):
    """The VJP of the XLA chunked form recomputed from the inputs (float32 inputs: float32 products); on the
    segment row layout with its segment ids."""
    from jaxlm.ops.loglinear import loglinear_ssd  # the XLA reference lives in jaxlm: imported lazily

    segment_ids = None if ranks is None else row_segment_ids(ranks, blocks.chunk)

    def reference(q, k, v, log_a, lam):
        return loglinear_ssd(q, k, v, log_a, all_level_columns(lam, q.shape[1]), impl="chunked",
                             chunk_size=blocks.chunk, segment_ids=segment_ids)

    precision = "float32" if inputs[2].dtype == jnp.float32 else None
    with jax.default_matmul_precision(precision):
        _, vjp = jax.vjp(reference, *inputs)
        return vjp(d_out.astype(inputs[2].dtype))


_loglinear_ssd.defvjp(_fwd_rule, _bwd_rule)
