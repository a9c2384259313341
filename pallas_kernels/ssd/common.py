"""Pieces shared by the SSD forward and backward kernels: float32-accumulating products, the decay factors of
one chunk, the launch options (interpret mode, Triton compiler parameters) and the launch of the sequential
state pass that both directions run.

Packed sequences reach the kernels as segment runs: ``runs [B, T]`` int32, the number of segment starts inside
a token's chunk up to and including the token (0: the token is still in the segment of the state entering the
chunk). Every decay factor of a chunk gets its mask from them:

    pairs           exp(c_t − c_s)      × [runs_t = runs_s]       (``causal_decay``)
    state read      exp(c_t)            × [runs_t = 0]            (``read_decay``)
    state write     exp(c_last − c_s)   × [runs_s = run_last]     (``write_decay``)
    state carry     exp(c_last)         × [run_last = 0]          (``carry_decay``)

Without runs (no segment ids) the masks are left out of the traced code altogether."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.registry import backend, interpret_mode


def contract(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int, precision=None) -> jax.Array:
    """``Σ_c a[.., c, ..] b[.., c, ..]`` over ``a_axis``/``b_axis`` with float32 accumulation; by default float32
    operands get full float32 products (``Precision.HIGHEST``: no TF32 on GPU), bf16 operands the bf16 tensor
    cores; ``precision=Precision.DEFAULT`` lets float32 products use TF32."""
    if precision is None and a.dtype == jnp.float32:
        precision = jax.lax.Precision.HIGHEST
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """``a @ b``: ``[M, C], [C, N] -> [M, N]`` float32 (``precision`` as in ``contract``)."""
    return contract(a, b, 1, 0, precision)


def dot_transposed_lhs(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """``aᵀ @ b``: ``[C, M], [C, N] -> [M, N]`` float32."""
    return contract(a, b, 0, 0, precision)


def dot_transposed_rhs(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """``a @ bᵀ``: ``[M, C], [N, C] -> [M, N]`` float32."""
    return contract(a, b, 1, 1, precision)


def causal_decay(cum: jax.Array, runs: jax.Array | None = None) -> jax.Array:
    """``L_ts = exp(c_t − c_s)`` for ``s ≤ t`` (and, given ``runs [C]`` int32, ``runs_t = runs_s``: the same
    segment), else 0: ``[C] -> [C, C]`` float32 (masked before the exp, so no overflow above the diagonal)."""
    size = cum.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    causal = rows >= cols
    if runs is not None:
        causal = causal & (runs[:, None] == runs[None, :])
    gap = jnp.where(causal, cum[:, None] - cum[None, :], 0.0)  # [C, C]
    return jnp.where(causal, jnp.exp(gap), 0.0)


def read_decay(cum: jax.Array, runs: jax.Array | None = None) -> jax.Array:
    """Weight of the entering state in each token's output: ``exp(c_t)``, times ``[runs_t = 0]`` (the token is
    still in the entering state's segment) given ``runs``. ``[C] -> [C]`` float32."""
    if runs is None:
        return jnp.exp(cum)
    entering = runs == 0
    return jnp.where(entering, jnp.exp(jnp.where(entering, cum, 0.0)), 0.0)


def write_decay(cum: jax.Array, cum_last: jax.Array, runs: jax.Array | None = None,
                run_last: jax.Array | None = None) -> jax.Array:
    """Weight of each token's ``k_s v_sᵀ`` in the state leaving the chunk: ``exp(c_last − c_s)``, times
    ``[runs_s = run_last]`` (the token is in the chunk's last segment) given ``runs``. ``[C], [1] -> [C]``."""
    if runs is None:
        return jnp.exp(cum_last - cum)
    in_last = runs == run_last
    return jnp.where(in_last, jnp.exp(jnp.where(in_last, cum_last - cum, 0.0)), 0.0)


def carry_decay(cum_last: jax.Array, run_last: jax.Array | None = None) -> jax.Array:
    """Weight of the entering state in the leaving one: ``exp(c_last)``, times ``[run_last = 0]`` (no segment
    starts inside the chunk) given ``run_last``. ``[1] -> [1]`` float32."""
    if run_last is None:
        return jnp.exp(cum_last)
    keeps = run_last == 0
    return jnp.where(keeps, jnp.exp(jnp.where(keeps, cum_last, 0.0)), 0.0)


def chunk_runs(runs_ref, start: int | jax.Array, size: int) -> tuple[jax.Array | None, jax.Array | None]:
    """``(runs [C], run_last [1])`` of the chunk at ``start`` of a 1-D runs ref; ``(None, None)`` without one
    (no segment ids: the masks of ``causal_decay`` … ``carry_decay`` are skipped)."""
    if runs_ref is None:
        return None, None
    return runs_ref[pl.ds(start, size)], last_row(runs_ref, start, size)


def last_row(ref, start: int | jax.Array, size: int) -> jax.Array:
    """``ref[start + size - 1]`` of a 1-D ref as a ``[1]`` array (Triton cannot pull a scalar out of a vector)."""
    return ref[pl.ds(start + size - 1, 1)]


def token_dims(x: jax.Array, time_major: bool) -> tuple[int, int, int, int]:
    """``(batch, length, heads, dim)`` of a ``[B, T, X, D]`` (time-major) or ``[B, X, T, D]`` (head-major) array."""
    batch, second, third, dim = x.shape
    return (batch, second, third, dim) if time_major else (batch, third, second, dim)


def token_spec(time_major: bool, heads: int | None, rows: int, cols: int, index) -> pl.BlockSpec:
    """Block of ``rows`` tokens x ``cols`` features of one head (``heads=None``, squeezed) or of ``heads``
    consecutive heads, over a time-major ``[B, T, X, D]`` or head-major ``[B, X, T, D]`` array.
    ``index(*grid) -> (batch, head block, row block, column block)``."""
    shape = (None, rows, heads, cols) if time_major else (None, heads, rows, cols)

    def index_map(*grid):
        batch, head, row, col = index(*grid)
        return (batch, row, head, col) if time_major else (batch, head, row, col)

    return pl.BlockSpec(shape, index_map)


def head_index(head: int, time_major: bool) -> tuple:
    """Index of one head's ``[rows, cols]`` inside a block of several heads from ``token_spec``."""
    return (slice(None), head) if time_major else (head,)


def launch_options(interpret, num_warps: int | None, num_stages: int | None = None) -> dict:
    """``pallas_call`` keywords: ``interpret`` (None: interpret on a CPU backend; or e.g.
    ``pltpu.InterpretParams()`` from a test) and, when compiling for a GPU, the Triton ``num_warps`` and
    ``num_stages`` (software-pipelining depth of the loops' loads); None keeps the Pallas default."""
    interpret = interpret_mode() if interpret is None else interpret
    if interpret or backend() != "gpu" or (num_warps is None and num_stages is None):
        return dict(interpret=interpret)
    from jax.experimental.pallas import triton as plgpu

    return dict(interpret=False, compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def runs_operand(runs: jax.Array | None, rows: int, index) -> tuple[list, list]:
    """``(BlockSpecs, operands)`` of the optional segment runs ``[B, T]`` int32: blocks of ``rows`` tokens of one
    batch row, ``index(*grid) -> (batch, row block)``; both empty without runs (no segment ids)."""
    if runs is None:
        return [], []
    return [pl.BlockSpec((None, rows), index)], [runs]


def sequential_state_pass(kernel_body, keyed: jax.Array, valued: jax.Array, cum: jax.Array, state: jax.Array, *,
                          chunk: int, key_block: int, value_block: int, num_warps: int | None,
                          num_stages: int | None, time_major: bool, interpret, name: str,
                          runs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Launch a pass that walks the chunks of one (batch, head) carrying a ``[key_block, value_block]`` state.

    Grid ``(B, H, K // key_block, V // value_block)``; ``T`` must be whole chunks, ``N = T // chunk``.
    Operands: ``keyed [B, G, T, K]`` (head h reads group ``h // (H // G)``), ``valued [B, H, T, V]`` (both
    ``[B, T, X, D]`` with ``time_major=True``), ``cum [B, H, T]`` float32 and the starting ``state [B, H, K, V]``.
    Results: one state per chunk ``[B, H, N, K, V]`` in ``keyed``'s dtype and the state left at the end of the
    walk ``[B, H, K, V]`` float32.

    ``kernel_body(keyed_ref, valued_ref, cum_ref, state_ref, states_ref, last_ref, *, chunk, num_chunks)`` sees
    one program's blocks: ``[T, key_block]``, ``[T, value_block]``, ``[T]``, ``[key_block, value_block]`` in;
    ``[N, key_block, value_block]``, ``[key_block, value_block]`` out. With ``runs [B, T]`` int32 (``runs_operand``)
    the body takes one more input, ``runs_ref [T]``, after ``state_ref``."""
    batch, length, groups, key_dim = token_dims(keyed, time_major)
    heads, value_dim = token_dims(valued, time_major)[2:]
    group_of = heads // groups
    num_chunks = length // chunk
    state_block = pl.BlockSpec((None, None, key_block, value_block), lambda b, h, i, j: (b, h, i, j))
    runs_specs, runs_operands = runs_operand(runs, length, lambda b, h, i, j: (b, 0))
    return pl.pallas_call(
        functools.partial(kernel_body, chunk=chunk, num_chunks=num_chunks),
        grid=(batch, heads, key_dim // key_block, value_dim // value_block),
        in_specs=[
            token_spec(time_major, None, length, key_block, lambda b, h, i, j: (b, h // group_of, 0, i)),
            token_spec(time_major, None, length, value_block, lambda b, h, i, j: (b, h, 0, j)),
            pl.BlockSpec((None, None, length), lambda b, h, i, j: (b, h, 0)),
            state_block,
            *runs_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_chunks, key_block, value_block), lambda b, h, i, j: (b, h, 0, i, j)),
            state_block,
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), keyed.dtype),
                   jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        name=name,
        **launch_options(interpret, num_warps, num_stages),
    )(keyed, valued, cum, state, *runs_operands)
