"""SSD forward kernels (Dao & Gu 2024, §6, chunkwise form), head-major layout, T padded to whole chunks.

Two passes, as in the chunkwise algorithm:

1. ``chunk_states``: one program per (batch, head, key block, value block) walks the chunks in order and stores the
   state entering every chunk, ``S_{n+1} = exp(c_last) S_n + (k ⊙ exp(c_last − c))ᵀ v`` with ``c`` the
   within-chunk cumulative log gates; it also writes the final state.
2. ``chunk_outputs``: one program per (batch, head, chunk, value block), all in parallel:
   ``O = ((Q Kᵀ) ⊙ L) V + exp(c) ⊙ (Q S_n)`` with ``L_ts = exp(c_t − c_s)`` for ``s ≤ t``.

Inputs: ``q, k [B, G, T, K]`` (head h reads group h // R), ``v [B, H, T, V]``, ``cum [B, H, T]`` float32,
``initial [B, H, K, V]`` float32. Products accumulate in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.registry import interpret_mode


def _contract(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """``Σ_c a[.., c, ..] b[.., c, ..]`` over ``a_axis``/``b_axis`` with float32 accumulation; float32 operands
    get full float32 products (``Precision.HIGHEST``: no TF32 on GPU), bf16 operands the bf16 tensor cores."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b``: ``[M, C], [C, N] -> [M, N]`` float32."""
    return _contract(a, b, 1, 0)


def _dot_transposed_lhs(a: jax.Array, b: jax.Array) -> jax.Array:
    """``aᵀ @ b``: ``[C, K], [C, V] -> [K, V]`` float32."""
    return _contract(a, b, 0, 0)


def _dot_transposed_rhs(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ bᵀ``: ``[C, K], [C', K] -> [C, C']`` float32."""
    return _contract(a, b, 1, 1)


def _chunk_states_kernel(k_ref, v_ref, cum_ref, initial_ref, states_ref, final_ref, *, chunk: int,
                         num_chunks: int):
    """Sequential over chunks: store the entering state, then ``S ← exp(c_last) S + (k ⊙ exp(c_last − c))ᵀ v``."""

    def step(n, state):  # state [K, BV] float32
        states_ref[n] = state
        rows = pl.ds(n * chunk, chunk)
        k = k_ref[rows, :]  # [C, K]
        v = v_ref[rows, :]  # [C, BV]
        cum = cum_ref[rows]  # [C]
        cum_last = cum_ref[pl.ds(n * chunk + chunk - 1, 1)]  # [1]
        weighted_k = (k.astype(jnp.float32) * jnp.exp(cum_last - cum)[:, None]).astype(k.dtype)  # [C, K]
        return jnp.exp(cum_last)[:, None] * state + _dot_transposed_lhs(weighted_k, v)

    final_ref[...] = jax.lax.fori_loop(0, num_chunks, step, initial_ref[...].astype(jnp.float32))


def _chunk_outputs_kernel(q_ref, k_ref, v_ref, cum_ref, state_ref, out_ref, *, chunk: int):
    """One chunk: ``O = ((Q Kᵀ) ⊙ L) V + exp(c) ⊙ (Q S)`` (module docstring)."""
    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [C, K], [C, K], [C, BV]
    cum = cum_ref[...]  # [C] float32
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    causal = rows >= cols
    gap = jnp.where(causal, cum[:, None] - cum[None, :], 0.0)  # masked before exp: no overflow
    weights = jnp.where(causal, jnp.exp(gap), 0.0) * _dot_transposed_rhs(q, k)  # [C, C] float32
    intra = _dot(weights.astype(v.dtype), v)  # [C, BV]
    inter = jnp.exp(cum)[:, None] * _dot(q, state_ref[...].astype(q.dtype))  # [C, BV]
    out_ref[...] = (intra + inter).astype(out_ref.dtype)


def chunk_states(k: jax.Array, v: jax.Array, cum: jax.Array, initial: jax.Array, *, chunk: int,
                 value_block: int, key_block: int) -> tuple[jax.Array, jax.Array]:
    """States entering every chunk ``[B, H, N, K, V]`` float32 and the final state ``[B, H, K, V]`` float32."""
    batch, groups, length, key_dim = k.shape
    heads, value_dim = v.shape[1], v.shape[3]
    group_of = heads // groups
    num_chunks = length // chunk
    kernel = functools.partial(_chunk_states_kernel, chunk=chunk, num_chunks=num_chunks)
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, key_dim // key_block, value_dim // value_block),
        in_specs=[
            pl.BlockSpec((None, None, length, key_block), lambda b, h, i, j: (b, h // group_of, 0, i)),
            pl.BlockSpec((None, None, length, value_block), lambda b, h, i, j: (b, h, 0, j)),
            pl.BlockSpec((None, None, length), lambda b, h, i, j: (b, h, 0)),
            pl.BlockSpec((None, None, key_block, value_block), lambda b, h, i, j: (b, h, i, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_chunks, key_block, value_block), lambda b, h, i, j: (b, h, 0, i, j)),
            pl.BlockSpec((None, None, key_block, value_block), lambda b, h, i, j: (b, h, i, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        interpret=interpret_mode(),
        name="ssd_chunk_states",
    )(k, v, cum, initial)


def chunk_outputs(q: jax.Array, k: jax.Array, v: jax.Array, cum: jax.Array, states: jax.Array, *, chunk: int,
                  value_block: int) -> jax.Array:
    """Outputs ``[B, H, T, V]`` in ``v``'s dtype from the entering states of ``chunk_states``."""
    batch, groups, length, key_dim = q.shape
    heads, value_dim = v.shape[1], v.shape[3]
    group_of = heads // groups
    return pl.pallas_call(
        functools.partial(_chunk_outputs_kernel, chunk=chunk),
        grid=(batch, heads, length // chunk, value_dim // value_block),
        in_specs=[
            pl.BlockSpec((None, None, chunk, key_dim), lambda b, h, n, j: (b, h // group_of, n, 0)),
            pl.BlockSpec((None, None, chunk, key_dim), lambda b, h, n, j: (b, h // group_of, n, 0)),
            pl.BlockSpec((None, None, chunk, value_block), lambda b, h, n, j: (b, h, n, j)),
            pl.BlockSpec((None, None, chunk), lambda b, h, n, j: (b, h, n)),
            pl.BlockSpec((None, None, None, key_dim, value_block), lambda b, h, n, j: (b, h, n, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, None, chunk, value_block), lambda b, h, n, j: (b, h, n, j)),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        interpret=interpret_mode(),
        name="ssd_chunk_outputs",
    )(q, k, v, cum, states)
