"""Packed sequences for the log-linear kernels: the segment row layout.

The Fenwick levels of log-linear attention are measured from each segment's start (``fenwick.segment_positions``:
``p_t = t − start``), so a segment that starts mid-chunk has its level buckets off the chunk grid. The kernels
instead see every segment cut into its own chunks of C positions, ``[start + jC, start + (j+1)C)`` (the
segment's *row* ``j``; its last row is padded with neutral tokens: ``k = v = q = 0``, ``log_a = 0``, ``β = 0``,
``λ = 0``), laid out one after another:

    slot of token t = C · row(t) + (p_t mod C),   row(t) = #{s ≤ t : p_s mod C = 0} − 1,

and each row carries its *rank* ``j = p_t >> log2 C`` (0: the segment's first row). On this layout the in-chunk
levels ``0 … log2 C`` are exactly those of one sequence, and the chunk levels are those of one sequence with the
chunk index replaced by the rank: row n reads chunk level ``i`` iff bit ``i`` of its rank is 1, from the state
built at row ``n − rank + ((rank >> i) << i)``, and the level stack restarts at every rank-0 row.

A batch row of T tokens in ``S`` segments needs ``Σ ceil(T_s / C) ≤ ceil(T / C) + S − 1`` rows; empty rows at
the end of the layout are rank-0 rows of neutral tokens, and the kernels' work grows with the rows. So
``on_segment_rows`` picks, on the device (``lax.switch``), the smallest of ``row_capacities(T, C)``:
``N + ceil(N / 8)`` rows (``N = ceil(T / C)``; enough for ``S ≤ N / 8 + 1``, e.g. segments averaging 8C tokens)
or ``2N`` rows (segments averaging at least C tokens), and the given fallback (the chunked XLA path) when
neither fits. Each capacity is a separately compiled kernel path.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxlm.ops.fenwick import num_levels, segment_positions


class SegmentRows(NamedTuple):
    """Where every token goes in the row layout of ``R`` rows of C slots (module docstring)."""

    slots: jax.Array  # [B, T] int32: C · row + (p mod C) of each token
    sources: jax.Array  # [B, R·C] int32: the token in each slot (T: a padding slot)
    ranks: jax.Array  # [B, R·C] int32: the rank of each slot's row in its segment
    fits: jax.Array  # [] bool: every batch row fits in R rows


def row_capacities(length: int, chunk: int) -> tuple[int, ...]:
    """The layout sizes ``on_segment_rows`` chooses from for ``length`` tokens, ascending:
    ``N + ceil(N / 8)`` and ``2N`` rows with ``N = ceil(length / chunk)`` (module docstring)."""
    num_chunks = -(-length // chunk)
    return tuple(sorted({num_chunks + -(-num_chunks // 8), 2 * num_chunks}))


def rows_needed(segment_ids: jax.Array, chunk: int) -> jax.Array:
    """``[]`` int32: the most layout rows a batch row of ``segment_ids [B, T]`` needs, ``max_b Σ ceil(T_s / C)``."""
    positions = segment_positions(segment_ids)  # [B, T]
    return jnp.max(jnp.sum(positions % chunk == 0, axis=1, dtype=jnp.int32))


def segment_rows(segment_ids: jax.Array, chunk: int, num_rows: int) -> SegmentRows:
    """The row layout of packed rows ``segment_ids [B, T]`` (a new segment wherever the id changes) with
    ``num_rows`` rows of ``chunk`` slots."""
    batch, length = segment_ids.shape
    positions = segment_positions(segment_ids)  # [B, T]
    row = jnp.cumsum(positions % chunk == 0, axis=1, dtype=jnp.int32) - 1  # [B, T]
    slots = row * chunk + positions % chunk  # [B, T]
    batch_index = jnp.arange(batch)[:, None]
    tokens = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    sources = jnp.full((batch, num_rows * chunk), length, jnp.int32).at[batch_index, slots].set(tokens, mode="drop")
    row_ranks = jnp.zeros((batch, num_rows), jnp.int32).at[batch_index, row].max(positions // chunk, mode="drop")
    ranks = jnp.repeat(row_ranks, chunk, axis=1)  # [B, R·C]
    return SegmentRows(slots, sources, ranks, jnp.all(row[:, -1] < num_rows))


def to_rows(x: jax.Array, rows: SegmentRows) -> jax.Array:
    """``[B, T, ...] -> [B, R·C, ...]``: every token into its slot, zeros in the padding slots."""
    return jax.vmap(lambda row, sources: jnp.take(row, sources, axis=0, mode="fill", fill_value=0))(x, rows.sources)


def from_rows(y: jax.Array, rows: SegmentRows) -> jax.Array:
    """``[B, R·C, ...] -> [B, T, ...]``: every token back from its slot."""
    return jax.vmap(lambda row, slots: row[slots])(y, rows.slots)


def row_segment_ids(ranks: jax.Array, chunk: int) -> jax.Array:
    """Segment ids of the layout ``[B, R·C]`` from its per-slot ranks: a new id at every rank-0 row (so the
    padding slots ending a segment's last row belong to that segment)."""
    row_starts = jnp.zeros_like(ranks).at[:, ::chunk].set(1)  # [B, R·C]
    return jnp.cumsum(row_starts * (ranks == 0), axis=1, dtype=jnp.int32)


def all_level_columns(lam: jax.Array, length: int) -> jax.Array:
    """``lam [B, T, H, L]`` with at least ``num_levels(length)`` columns, the missing ones zero (the kernels count
    missing columns as 0; the XLA path wants them all)."""
    missing = max(num_levels(length) - lam.shape[-1], 0)
    return jnp.pad(lam, ((0, 0), (0, 0), (0, 0), (0, missing)))


def on_segment_rows(name: str, kernels: Callable[..., jax.Array], fallback: Callable[..., jax.Array],
                    token_arrays: tuple, segment_ids: jax.Array, chunk: int) -> jax.Array:
    """``kernels(*arrays_on_rows, ranks)`` on the smallest layout of ``row_capacities`` that every batch row fits,
    mapped back to the tokens, else ``fallback(*token_arrays, segment_ids)``; both return ``[B, T, ...]`` of one
    shape and dtype. ``token_arrays``: the ``[B, T, ...]`` float operands (the layout's padding slots get zeros).
    ValueError (naming the caller ``name``) for ``segment_ids`` of another shape than ``[B, T]``.

    Differentiable: the backward switches to the taken branch's own VJP, recomputing that branch's forward.
    (Differentiating ``lax.switch`` directly makes every branch return every other branch's residuals, zero-filled,
    which cost more than the recomputation.)"""
    expected = token_arrays[0].shape[:2]
    if segment_ids.shape != expected:
        raise ValueError(f"{name}: segment_ids must be [B, T]={expected}, got {segment_ids.shape}")
    return _recomputed_switch(kernels, fallback, chunk, tuple(token_arrays), segment_ids)


def _branches(kernels, fallback, chunk: int, segment_ids: jax.Array) -> tuple[jax.Array, list]:
    """(the branch to take, one ``arrays -> out`` function per layout capacity and the fallback last)."""
    capacities = row_capacities(segment_ids.shape[1], chunk)

    def on_rows(num_rows: int):
        def run(arrays):
            rows = segment_rows(segment_ids, chunk, num_rows)
            return from_rows(kernels(*(to_rows(x, rows) for x in arrays), rows.ranks), rows)

        return run

    branch = jnp.searchsorted(jnp.asarray(capacities), rows_needed(segment_ids, chunk))  # len(capacities): none fits
    return branch, [on_rows(num_rows) for num_rows in capacities] + [lambda arrays: fallback(*arrays, segment_ids)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recomputed_switch(kernels, fallback, chunk, token_arrays, segment_ids):
    branch, functions = _branches(kernels, fallback, chunk, segment_ids)
    return lax.switch(branch, functions, token_arrays)


def _switch_fwd(kernels, fallback, chunk, token_arrays, segment_ids):
    return _recomputed_switch(kernels, fallback, chunk, token_arrays, segment_ids), (token_arrays, segment_ids)


def _switch_bwd(kernels, fallback, chunk, residuals, d_out):
    token_arrays, segment_ids = residuals
    branch, functions = _branches(kernels, fallback, chunk, segment_ids)

    def pulled_back(function):
        def run(operands):
            arrays, cotangent = operands
            return jax.vjp(function, arrays)[1](cotangent)[0]

        return run

    return lax.switch(branch, [pulled_back(function) for function in functions], (token_arrays, d_out)), None


_recomputed_switch.defvjp(_switch_fwd, _switch_bwd)
