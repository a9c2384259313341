"""Pieces shared by the SSD forward and backward kernels: float32-accumulating products, the causal decay
mask of one chunk, the launch options (interpret mode, Triton compiler parameters) and the launch of the
sequential state pass that both directions run."""

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


def causal_decay(cum: jax.Array) -> jax.Array:
    """``L_ts = exp(c_t − c_s)`` for ``s ≤ t``, else 0: ``[C] -> [C, C]`` float32 (masked before the exp, so no
    overflow above the diagonal)."""
    size = cum.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    causal = rows >= cols
    gap = jnp.where(causal, cum[:, None] - cum[None, :], 0.0)  # [C, C]
    return jnp.where(causal, jnp.exp(gap), 0.0)


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


def sequential_state_pass(kernel_body, keyed: jax.Array, valued: jax.Array, cum: jax.Array, state: jax.Array, *,
                          chunk: int, key_block: int, value_block: int, num_warps: int | None,
                          num_stages: int | None, time_major: bool, interpret, name: str
                          ) -> tuple[jax.Array, jax.Array]:
    """Launch a pass that walks the chunks of one (batch, head) carrying a ``[key_block, value_block]`` state.

    Grid ``(B, H, K // key_block, V // value_block)``; ``T`` must be whole chunks, ``N = T // chunk``.
    Operands: ``keyed [B, G, T, K]`` (head h reads group ``h // (H // G)``), ``valued [B, H, T, V]`` (both
    ``[B, T, X, D]`` with ``time_major=True``), ``cum [B, H, T]`` float32 and the starting ``state [B, H, K, V]``.
    Results: one state per chunk ``[B, H, N, K, V]`` in ``keyed``'s dtype and the state left at the end of the
    walk ``[B, H, K, V]`` float32.

    ``kernel_body(keyed_ref, valued_ref, cum_ref, state_ref, states_ref, last_ref, *, chunk, num_chunks)`` sees
    one program's blocks: ``[T, key_block]``, ``[T, value_block]``, ``[T]``, ``[key_block, value_block]`` in;
    ``[N, key_block, value_block]``, ``[key_block, value_block]`` out."""
    batch, length, groups, key_dim = token_dims(keyed, time_major)
    heads, value_dim = token_dims(valued, time_major)[2:]
    group_of = heads // groups
    num_chunks = length // chunk
    state_block = pl.BlockSpec((None, None, key_block, value_block), lambda b, h, i, j: (b, h, i, j))
    return pl.pallas_call(
        functools.partial(kernel_body, chunk=chunk, num_chunks=num_chunks),
        grid=(batch, heads, key_dim // key_block, value_dim // value_block),
        in_specs=[
            token_spec(time_major, None, length, key_block, lambda b, h, i, j: (b, h // group_of, 0, i)),
            token_spec(time_major, None, length, value_block, lambda b, h, i, j: (b, h, 0, j)),
            pl.BlockSpec((None, None, length), lambda b, h, i, j: (b, h, 0)),
            state_block,
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_chunks, key_block, value_block), lambda b, h, i, j: (b, h, 0, i, j)),
            state_block,
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), keyed.dtype),
                   jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        name=name,
        **launch_options(interpret, num_warps, num_stages),
    )(keyed, valued, cum, state)
