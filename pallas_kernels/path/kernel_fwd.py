"""PaTH forward kernel (Yang et al. 2025, section 3.2), FlashAttention style, head-major layout, T padded
to whole blocks of C tokens.

One program per (batch, query head, query block n). It first builds its own block's terms from the raw
q, k, w of the block and the block's UT transform 𝒯 (``jaxlm.ops.path_blockwise`` module docstring):

    A_q = tril(Q Wᵀ),  A_k = strictlower(W Kᵀ),  S = Q Kᵀ − (A_q 𝒯) A_k,  Q̄ = Q − (A_q 𝒯) W

(the causal intra-block logits and the queries carried to the block start), then scans the key blocks
right to left with an online softmax, in two phases (``superblocks`` module docstring; S key blocks per
super-block, σ = ⌊n / S⌋ the super-block of n):

- the earlier blocks of its own super-block, ``j = n − 1, …, σS``, one block at a time: logits against the
  keys carried to their block end ``k̄_j``, then the move ``Q̄ ← Q̄ P_j`` past the block's Householder product
  ``P_j = I − W_jᵀ 𝒯_j W_j``;
- then the earlier super-blocks ``τ = σ − 1, …, 0``: logits against each of their S key blocks with the keys
  carried to the super-block end ``k̂_j``, then one move ``Q̄ ← Q̄ Φ_τ`` past the whole super-block (none
  after super-block 0).

Every key block meets the query state with the online softmax

    ℓ_ij = scale · q̄_i · k_j + G_i − G_j      (masked to −1e30 across segments; causal inside block n)
    m ← max(m, max_j ℓ_ij),  l ← l·e^{m_old − m} + Σ_j e^{ℓ_ij − m},
    acc ← acc·e^{m_old − m} + e^{ℓ − m} V_j,

so a query block makes ``n mod S + max(σ − 1, 0)`` float32 ``[C, D] x [D, D]`` moves instead of n. On an H100
at 32 × 4096 × 32 × 64 the moves were half the kernel's time with one per block (35.5 ms; 18.4 ms with none),
and six sevenths at 4 × 16384 × 16 × 128 (137 ms; 21 ms with none). The program writes ``O = acc / l`` and the
log-sum-exp ``L = m + log l`` (float32). The query state, gates, 𝒯, block products and softmax statistics are
float32; the logits and value products run in the inputs' dtype with float32 accumulation. The float32
products (intra-block terms, the moves) are full float32 for float32 inputs and TF32 for bf16 ones (relative
error ~1e-3, below bf16's).

Inputs: ``q [B, H, T', D]``; raw ``k, w [B, G, T', D]`` (head h reads KV head h // (H / G)); carried keys
``k̄`` and values ``[B, G, T', D]``; ``transform [B, G, N·C, C]`` float32 (block n's 𝒯 in rows
``n·C … n·C + C − 1``); ``products [B, G, N·D, D]`` float32 (likewise by D rows); the keys carried to their
super-block end ``k̂ [B, G, T'', D]`` (T'' ≥ T') and the super-block products ``Φ [B, G, ceil(N / S)·D, D]``
float32 (``superblocks``); optionally ``gate [B, H, T']`` float32 and ``segments [B, T']`` int32 (−1 on the
padding). Without segments the padded tail needs no mask: padded keys only meet queries of the last block,
through its causal mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.path.kernel_bwd_common import gated_logits as shared_gated_logits
from pallas_kernels.ssd.common import contract, dot, dot_transposed_rhs, launch_options


def kernel_precision(dtype) -> jax.lax.Precision:
    """Precision of the kernels' float32 products: full float32 for float32 inputs, TF32 for bf16 ones."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def raw_product(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int, precision) -> jax.Array:
    """``contract`` of two raw inputs (q, k or w) in their common dtype, float32 accumulation: products of bf16
    values are exact in float32, so bf16 inputs take the bf16 tensor cores (twice TF32's rate) at no loss of
    accuracy; float32 inputs take ``precision``."""
    dtype = jnp.result_type(a.dtype, b.dtype)
    return contract(a.astype(dtype), b.astype(dtype), a_axis, b_axis, precision if dtype == jnp.float32 else None)


def optional_specs(gate, segments, length: int, gate_index) -> tuple[list, list]:
    """``(BlockSpecs, operands)`` of the optional forget gate ``[B, H, T']`` (whole rows, ``gate_index(b, h, i)``)
    and segment ids ``[B, T']`` (one batch row), in that order; absent ones are left out."""
    specs, operands = [], []
    if gate is not None:
        specs.append(pl.BlockSpec((None, None, length), gate_index))
        operands.append(gate)
    if segments is not None:
        specs.append(pl.BlockSpec((None, length), lambda b, h, i: (b, 0)))
        operands.append(segments)
    return specs, operands


def own_block_terms(q, k, w, transform, precision):
    """(intra-block logits ``S = Q Kᵀ − A_q 𝒯 A_k`` ``[C, C]``, queries at the block start
    ``Q̄ = Q − A_q 𝒯 W`` ``[C, D]``), float32, from the block's ``q, k, w [C, D]`` and ``transform [C, C]``."""
    block = q.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    query_mixing = jnp.where(rows >= cols, raw_product(q, w, 1, 1, precision), 0.0)  # A_q[i, r] = q_i·w_r  [C, C]
    key_mixing = jnp.where(rows > cols, raw_product(w, k, 1, 1, precision), 0.0)  # A_k[s, j] = w_s·k_j  [C, C]
    mixed = dot(query_mixing, transform, precision)  # A_q 𝒯  [C, C]
    intra = raw_product(q, k, 1, 1, precision) - dot(mixed, key_mixing, precision)  # [C, C]
    return intra, q.astype(jnp.float32) - dot(mixed, w.astype(jnp.float32), precision)


def _forward_kernel(*refs, block: int, dim: int, num_blocks: int, superblock: int, scale: float, precision,
                    with_gate: bool, with_segments: bool):
    """One query block: its own block, the rest of its super-block block by block, then the earlier
    super-blocks (module docstring). The gate and segment refs are present only when ``with_gate`` /
    ``with_segments``."""
    (q_ref, raw_keys_ref, directions_ref, transform_ref, keys_ref, values_ref, products_ref, superkeys_ref,
     superproducts_ref, *optional, out_ref, logsumexp_ref) = refs
    gate_ref = optional.pop(0) if with_gate else None
    segments_ref = optional.pop(0) if with_segments else None
    query_block = num_blocks - 1 - pl.program_id(2)  # the longest scans start first
    own = pl.ds(query_block * block, block)

    def gated_logits(raw, key_rows, visible):
        """``scale·s_ij + G_i − G_j`` where ``visible`` and i, j share a segment, MASKED_LOGIT elsewhere."""
        return shared_gated_logits(raw, scale, gate_ref[own] if with_gate else None,
                                   gate_ref[key_rows] if with_gate else None,
                                   segments_ref[own] if with_segments else None,
                                   segments_ref[key_rows] if with_segments else None, visible)

    def attend(key_block, keys_source, queries, softmax):
        """Online-softmax update of ``softmax = (m, l, acc)`` with key block ``key_block``, its keys read from
        ``keys_source`` (carried to wherever ``queries [C, D]`` stand)."""
        running_max, running_sum, accumulator = softmax
        keys_rows = pl.ds(key_block * block, block)
        keys = keys_source[keys_rows, :]  # [C, D]
        values = values_ref[keys_rows, :]  # [C, D]
        logits = gated_logits(dot_transposed_rhs(queries.astype(keys.dtype), keys), keys_rows, None)  # [C, C]
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))  # [C]
        rescale = jnp.exp(running_max - new_max)  # [C]
        probabilities = jnp.exp(logits - new_max[:, None])  # [C, C]
        running_sum = running_sum * rescale + jnp.sum(probabilities, axis=1)
        accumulator = accumulator * rescale[:, None] + dot(probabilities.astype(values.dtype), values)
        return new_max, running_sum, accumulator

    def move(matrices_ref, index, queries):
        """``Q̄ ← Q̄ M`` for the ``[D, D]`` float32 matrix ``index`` of ``matrices_ref``  [C, D]."""
        return dot(queries, matrices_ref[pl.ds(index * dim, dim), :], precision)

    intra, queries = own_block_terms(q_ref[...], raw_keys_ref[...], directions_ref[...], transform_ref[...],
                                      precision)  # [C, C], [C, D]
    rows = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    logits = gated_logits(intra, own, rows >= cols)  # [C, C]
    running_max = jnp.max(logits, axis=1)  # [C]; finite: every token sees itself
    probabilities = jnp.exp(logits - running_max[:, None])  # [C, C]
    own_values = values_ref[own, :]  # [C, D]
    softmax = (running_max, jnp.sum(probabilities, axis=1), dot(probabilities.astype(own_values.dtype), own_values))

    def visit_own_superblock(step, carry):
        """Key block ``n − 1 − step`` of n's own super-block: attend with ``k̄_j``, then ``Q̄ ← Q̄ P_j``."""
        queries, softmax = carry
        key_block = query_block - 1 - step
        return move(products_ref, key_block, queries), attend(key_block, keys_ref, queries, softmax)

    def attend_superblock(first, count, queries, softmax):
        """Key blocks ``first … first + count − 1`` of one super-block with ``k̂_j``, queries at its end."""
        return jax.lax.fori_loop(first, first + count,
                                 lambda key_block, s: attend(key_block, superkeys_ref, queries, s), softmax)

    def visit_superblock(step, carry):
        """Super-block ``τ = σ − 1 − step`` (τ ≥ 1): attend its blocks, then ``Q̄ ← Q̄ Φ_τ``."""
        queries, softmax = carry
        index = own_superblock - 1 - step
        return move(superproducts_ref, index, queries), attend_superblock(index * superblock, superblock, queries,
                                                                          softmax)

    own_superblock = query_block // superblock
    carry = jax.lax.fori_loop(0, query_block - own_superblock * superblock, visit_own_superblock, (queries, softmax))
    queries, softmax = jax.lax.fori_loop(0, jnp.maximum(own_superblock - 1, 0), visit_superblock, carry)
    # Super-block 0 (when n is past it) without the move after it, which no key block would read.
    first_blocks = jnp.minimum(own_superblock, 1) * superblock  # S if σ > 0, else 0
    running_max, running_sum, accumulator = attend_superblock(0, first_blocks, queries, softmax)
    out_ref[...] = accumulator / running_sum[:, None]
    logsumexp_ref[...] = running_max + jnp.log(running_sum)


def path_forward(q, raw_keys, directions, transform, keys, values, products, superkeys, superproducts, gate=None,
                 segments=None, *, block: int, superblock: int, scale: float, interpret=None,
                 num_warps: int | None = None, num_stages: int | None = None):
    """Outputs ``[B, H, T', D]`` float32 and log-sum-exps ``[B, H, N, C]`` float32 (module docstring).

    ``superblock``: the S key blocks per super-block that ``superkeys`` and ``superproducts`` were built with.
    ``gate`` / ``segments`` None: no forget gate / one segment. ``interpret``: None runs in interpret mode
    on CPU only; a ``pltpu.InterpretParams()`` interprets with TPU semantics. ``num_warps`` /
    ``num_stages``: Triton settings on GPU (None: Pallas' defaults).
    """
    batch, heads, length, dim = q.shape
    groups = keys.shape[1]
    heads_per_group = heads // groups
    num_blocks = length // block
    precision = kernel_precision(keys.dtype)
    kernel = functools.partial(_forward_kernel, block=block, dim=dim, num_blocks=num_blocks, superblock=superblock,
                               scale=scale, precision=precision, with_gate=gate is not None,
                               with_segments=segments is not None)

    def query_rows(b, h, i):
        return b, h, num_blocks - 1 - i, 0

    def kv_rows(b, h, i):
        return b, h // heads_per_group, num_blocks - 1 - i, 0

    def whole_kv_head(b, h, i):
        return b, h // heads_per_group, 0, 0

    in_specs = [
        pl.BlockSpec((None, None, block, dim), query_rows),
        pl.BlockSpec((None, None, block, dim), kv_rows),
        pl.BlockSpec((None, None, block, dim), kv_rows),
        pl.BlockSpec((None, None, block, block), kv_rows),
        pl.BlockSpec((None, None, length, dim), whole_kv_head),
        pl.BlockSpec((None, None, length, dim), whole_kv_head),
        pl.BlockSpec((None, None, num_blocks * dim, dim), whole_kv_head),
        pl.BlockSpec((None, None) + superkeys.shape[2:], whole_kv_head),
        pl.BlockSpec((None, None) + superproducts.shape[2:], whole_kv_head),
    ]
    extra_specs, optional = optional_specs(gate, segments, length, lambda b, h, i: (b, h, 0))
    in_specs += extra_specs
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, num_blocks),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, block, dim), query_rows),
            pl.BlockSpec((None, None, None, block), query_rows),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, length, dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, num_blocks, block), jnp.float32)],
        **launch_options(interpret, num_warps, num_stages),
        name="path_forward",
    )(q, raw_keys, directions, transform, keys, values, products, superkeys, superproducts, *optional)
