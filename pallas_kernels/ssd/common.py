"""Pieces shared by the SSD forward and backward kernels: float32-accumulating products, the causal decay
mask of one chunk, and the launch options (interpret mode, Triton compiler parameters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.registry import backend, interpret_mode


def contract(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """``Σ_c a[.., c, ..] b[.., c, ..]`` over ``a_axis``/``b_axis`` with float32 accumulation; float32 operands
    get full float32 products (``Precision.HIGHEST``: no TF32 on GPU), bf16 operands the bf16 tensor cores."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b``: ``[M, C], [C, N] -> [M, N]`` float32."""
    return contract(a, b, 1, 0)


def dot_transposed_lhs(a: jax.Array, b: jax.Array) -> jax.Array:
    """``aᵀ @ b``: ``[C, M], [C, N] -> [M, N]`` float32."""
    return contract(a, b, 0, 0)


def dot_transposed_rhs(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ bᵀ``: ``[M, C], [N, C] -> [M, N]`` float32."""
    return contract(a, b, 1, 1)


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
