"""UT transform of the gated delta rule, one program per (batch, head, chunk), all in parallel.

Within a chunk of C tokens (``g`` the within-chunk inclusive cumulative log gates, ``γ = exp(g)``,
``Γ_ij = exp(g_i − g_j)``), the WY/UT form (Yang, Kautz, Hatamizadeh 2025, §3.2) needs

    X = (I + L)⁻¹,    L = strictlower(diag(β) (K Kᵀ ⊙ Γ)),
    W = X diag(β γ) K   [C, K],    U₀ = X diag(β) V   [C, V],

so that the pseudo-values of a chunk entering with state ``S`` are ``U = U₀ − W S``. ``X`` is built from
``b × b`` blocks (``b`` = ``sub_block``, ``[S, S]`` in the shape comments): each diagonal block
``X_ii = (I + L_ii)⁻¹`` by repeated squaring (``pallas_kernels.triangular``), and the blocks below the diagonal by

    X_ij = −X_ii Σ_{m=j}^{i−1} L_im X_mj    (j < i),

all in float32 (float32 products at the precision ``float32_dots`` names: ``float32_dots.py``). ``W`` and ``U₀``
are then products in the input dtype (bf16 tensor cores for bf16 inputs) with float32 accumulation.

Inputs, time-major and padded to whole chunks: ``k [B, T, G, K]`` (head h reads group h // R),
``v [B, T, H, V]``, ``beta, cum [B, T, H]`` float32. Outputs ``W [B, T, H, K]`` in k's dtype,
``U₀ [B, T, H, V]`` in v's dtype, and the keys decayed to the chunk end ``K ⊙ exp(g_C − g) [B, T, H, K]`` in
k's dtype (the state update's left operand, computed here so the sequential pass does less per chunk).
With ``store_inverse`` it also writes ``X`` itself, ``[B, T, H, C]`` float32 (row t of its chunk's ``X``), which
the per-chunk gradient kernel (``kernel_chunk_bwd``) reads instead of rebuilding it.

Packed sequences (optional ``runs [B, T]`` int32, ``pallas_kernels.ssd.common``: segment starts so far inside the
chunk): a start at token t resets the state, which is the recurrence with ``a_t = 0``, i.e. ``g = −∞`` from t on.
That limit of the factors above is the masked factors ``Γ_ij × [runs_i = runs_j]`` (in ``L``),
``γ_i × [runs_i = 0]`` (in ``W``) and ``exp(g_C − g_j) × [runs_j = run_C]`` (in ``K̃``), so the form stays exact:
``L`` couples only tokens of one segment, hence ``I + L`` and ``X`` are block diagonal over the segments (the
inverse never mixes two segments), and the rows of ``W`` after the chunk's first start are zero (those tokens
never see the entering state through ``U = U₀ − W S``). Without runs the masks are not traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gdn.float32_dots import float32_precision
from pallas_kernels.ssd.common import (dot, dot_transposed_rhs, last_row, launch_options, read_decay, runs_operand,
                                       write_decay)
from pallas_kernels.triangular import blocked_unit_lower_inverse, store_lower_blocks


def _coupling_block(keys_i, keys_j, gates_i, gates_j, beta_i, diagonal: bool, runs_i=None,
                    runs_j=None) -> jax.Array:
    """Block ``(i, j)`` (``i ≥ j``) of ``L = strictlower(diag(β) (K Kᵀ ⊙ Γ))``: ``[S, S]`` float32; with the
    segment runs of both blocks ``Γ`` is also masked by ``[runs_i = runs_j]`` (module docstring)."""
    gram = dot_transposed_rhs(keys_i, keys_j)  # [S, S]
    gap = gates_i[:, None] - gates_j[None, :]  # g_i − g_j  [S, S]
    connected = None
    if diagonal:
        size = gram.shape[0]
        connected = (jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
                     > jax.lax.broadcasted_iota(jnp.int32, (size, size), 1))  # strictly lower
    if runs_i is not None:
        same_run = runs_i[:, None] == runs_j[None, :]  # [S, S]
        connected = same_run if connected is None else connected & same_run
    if connected is None:
        decay = jnp.exp(gap)  # rows come after columns: g_i ≤ g_j, no overflow
    else:
        decay = jnp.where(connected, jnp.exp(jnp.where(connected, gap, 0.0)), 0.0)
    return beta_i[:, None] * gram * decay


def _ut_transform_kernel(k_ref, v_ref, beta_ref, cum_ref, *refs, chunk: int, sub_block: int, precision,
                         segmented: bool):
    """One chunk: ``X`` block by block, then ``W = X diag(βγ) K``, ``U₀ = X diag(β) V`` and the keys decayed to
    the chunk end ``K ⊙ exp(g_C − g)`` (module docstring). ``refs``: the runs ref when ``segmented``, then the
    outputs ``W``, ``U₀``, ``K̃`` and, when given, ``X``."""
    runs_ref, (w_ref, u_ref, decayed_ref, *inverse_ref) = (refs[0], refs[1:]) if segmented else (None, refs)
    count = chunk // sub_block
    block_rows = [pl.ds(i * sub_block, sub_block) for i in range(count)]
    keys = [k_ref[rows, :] for rows in block_rows]  # [S, K] each
    gates = [cum_ref[rows] for rows in block_rows]  # [S] float32 each
    betas = [beta_ref[rows] for rows in block_rows]  # [S] float32 each
    runs = [runs_ref[rows] if segmented else None for rows in block_rows]  # [S] int32 each (None: no segments)
    run_last = last_row(runs_ref, 0, chunk) if segmented else None  # [1]
    gate_last = last_row(cum_ref, 0, chunk)  # g_C  [1]
    for key, gate, run, rows in zip(keys, gates, runs, block_rows):
        to_end = write_decay(gate, gate_last, run, run_last)  # exp(g_C − g) (× [last run])  [S]
        decayed_ref[rows, :] = (key.astype(jnp.float32) * to_end[:, None]).astype(decayed_ref.dtype)
    def coupling(i, m):  # L_im  [S, S]
        return _coupling_block(keys[i], keys[m], gates[i], gates[m], betas[i], i == m, runs[i], runs[m])

    inverse = blocked_unit_lower_inverse(coupling, count, precision)  # (i, j) -> X_ij  [S, S] float32
    if inverse_ref:
        store_lower_blocks(inverse_ref[0], inverse, block_rows)
    scaled_keys = [(keys[j].astype(jnp.float32) * (betas[j] * read_decay(gates[j], runs[j]))[:, None])
                   .astype(keys[j].dtype) for j in range(count)]  # diag(βγ) K  [S, K]
    values = [v_ref[rows, :] for rows in block_rows]
    scaled_values = [(values[j].astype(jnp.float32) * betas[j][:, None]).astype(values[j].dtype)
                     for j in range(count)]  # diag(β) V  [S, V]
    for i, rows in enumerate(block_rows):
        w = sum(dot(inverse[i, j].astype(scaled_keys[j].dtype), scaled_keys[j]) for j in range(i + 1))  # [S, K]
        u = sum(dot(inverse[i, j].astype(scaled_values[j].dtype), scaled_values[j]) for j in range(i + 1))
        w_ref[rows, :] = w.astype(w_ref.dtype)
        u_ref[rows, :] = u.astype(u_ref.dtype)


def ut_transform(k: jax.Array, v: jax.Array, beta: jax.Array, cum: jax.Array, *, chunk: int, sub_block: int,
                 num_warps: int | None = None, store_inverse: bool = False, float32_dots: str = "ieee",
                 interpret=None, runs: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """``(W [B, T, H, K], U₀ [B, T, H, V], K ⊙ exp(g_C − g) [B, T, H, K])`` of every chunk, then
    ``X [B, T, H, C]`` float32 with ``store_inverse`` (module docstring); ``float32_dots``: precision of the
    float32 products (``float32_dots.FLOAT32_DOTS``); ``runs [B, T]`` int32: the segment runs of packed
    sequences (``pallas_kernels.ssd.api.segment_runs``), None for one sequence per row."""
    batch, length, groups, key_dim = k.shape
    heads, value_dim = v.shape[2], v.shape[3]
    group_of = heads // groups
    kernel = functools.partial(_ut_transform_kernel, chunk=chunk, sub_block=sub_block,
                               precision=float32_precision(float32_dots, interpret), segmented=runs is not None)
    runs_specs, runs_operands = runs_operand(runs, chunk, lambda b, h, n: (b, n))
    inverse_spec = [pl.BlockSpec((None, chunk, None, chunk), lambda b, h, n: (b, n, h, 0))] if store_inverse else []
    inverse_shape = [jax.ShapeDtypeStruct((batch, length, heads, chunk), jnp.float32)] if store_inverse else []
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, length // chunk),
        in_specs=[
            pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n: (b, n, h // group_of, 0)),
            pl.BlockSpec((None, chunk, None, value_dim), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, chunk, None), lambda b, h, n: (b, n, h)),
            pl.BlockSpec((None, chunk, None), lambda b, h, n: (b, n, h)),
            *runs_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, chunk, None, value_dim), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, chunk, None, key_dim), lambda b, h, n: (b, n, h, 0)),
            *inverse_spec,
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, key_dim), k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((batch, length, heads, key_dim), k.dtype),
                   *inverse_shape],
        name="gdn_ut_transform",
        **launch_options(interpret, num_warps, None),
    )(k, v, beta, cum, *runs_operands)
