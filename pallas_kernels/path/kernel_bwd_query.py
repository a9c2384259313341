"""PaTH backward, query side: one program per (batch, query head, query block n) computes the cotangents of
its queries at the block start ``Q̄_n``, of its intra-block logits ``S_n`` and of its gates, and adds its share
of the cotangents of the block products ``dP_j`` of its own super-block and of the earlier super-blocks'
products ``dΦ_τ`` (``kernel_bwd`` module docstring gives the equations; ``superblocks`` the super-block terms).

With S key blocks per super-block and σ = ⌊n / S⌋, query block n meets the key blocks of its own super-block
(``σS ≤ j < n``) one block at a time and the earlier super-blocks τ < σ whole, through the keys carried to
their super-block end ``K̂``:

    A_j = Q̄_n P_{n−1} … P_{j+1}   (σS ≤ j < n),      X = A_{σS} P_{σS}   (the query at the end of super-block σ − 1),
    X_τ = X Φ_{σ−1} … Φ_{τ+1}    (τ < σ),          ℓ_nj = scale · A_j K̄_jᵀ or scale · X_τ K̂_jᵀ (+ gates).

The cotangent ``Ē`` of the current query state runs left to right, through the earlier super-blocks, then
the own blocks:

    Ē_τ = scale · Σ_{j∈τ} dℓ_j K̂_j + Ē_{τ−1} Φ_τᵀ,    dΦ_τ += X_τᵀ Ē_{τ−1}       (Ē_{−1} = 0),
    Ē_j = scale · dℓ_j K̄_j + Ē_{j−1} P_jᵀ,          dP_j += A_jᵀ Ē_{j−1}        (Ē_{σS−1} = Ē_{σ−1}),

and ``dQ̄_n = Ē_{n−1}``. The products cannot be inverted (β = 1 makes them singular), so ``A_j`` and ``X_τ`` are
rebuilt from ``Q̄_n`` and ``X``: about ``(n mod S)² / 2 + σ² / 2`` ``[C, D] x [D, D]`` products per query block,
against one per key block pair for the logits' ``[C, C]`` products. The program also writes ``X``, which the
key side reads. The cotangents of ``K̂`` come from the key side; ``kernel_bwd`` pulls ``dK̂`` and ``dΦ`` back to
``dK̄`` and ``dP``.

Different query blocks (and the query heads of one KV head) add into the same ``dP_j`` and ``dΦ_τ``: those adds
are atomic (``pallas.triton.atomic_add``: GPU and interpret mode; a TPU version would need another
reduction). The grid runs query blocks outermost, ``(n, batch, head)``, so programs in flight add into
different heads' products: on an H100 at 32 x 4096 x 32 x 64 the kernel before super-block keys took 175 ms
against 207 ms with ``(batch, head, n)`` and 184 ms with ``(batch, n, head)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.path.kernel_bwd_common import (block_rows, causal_mask, contract, dot, dot_transposed_rhs,
                                                   gated_logits, logit_cotangent)
from pallas_kernels.path.kernel_fwd import kernel_precision, optional_specs
from pallas_kernels.ssd.common import launch_options


def _query_kernel(*refs, block: int, dim: int, superblock: int, scale: float, precision, with_gate: bool,
                  with_segments: bool):
    """One query block: its own block's logits, then the earlier super-blocks and the earlier blocks of its own
    super-block left to right (module docstring)."""
    (queries_ref, intra_ref, keys_ref, superkeys_ref, values_ref, products_ref, superproducts_ref, d_out_ref,
     logsumexp_ref, delta_ref, *optional, _, _, d_queries_ref, d_intra_ref, d_gate_ref, d_products_ref,
     d_superproducts_ref, superblock_queries_ref) = refs
    gate_ref = optional.pop(0) if with_gate else None
    segments_ref = optional.pop(0) if with_segments else None
    query_block = pl.num_programs(0) - 1 - pl.program_id(0)  # the longest scans start first
    own = block_rows(query_block, block)
    d_out, logsumexp, delta = d_out_ref[...], logsumexp_ref[...], delta_ref[...]  # [C, D], [C], [C]

    def cotangent_of_logits(raw, key_rows, visible):
        """``dℓ [C, C']`` of this query block against the keys in ``key_rows``."""
        logits = gated_logits(raw, scale, gate_ref[own] if with_gate else None,
                              gate_ref[key_rows] if with_gate else None,
                              segments_ref[own] if with_segments else None,
                              segments_ref[key_rows] if with_segments else None, visible)
        return logit_cotangent(logits, logsumexp, delta, d_out, values_ref[key_rows, :])[1]

    d_own = cotangent_of_logits(intra_ref[...], own, causal_mask(block))  # [C, C]
    d_intra_ref[...] = scale * d_own

    def times(matrices_ref, index, queries):
        """``A ← A M`` for the ``[D, D]`` float32 matrix ``index`` of ``matrices_ref``  [C, D]."""
        return dot(queries, matrices_ref[block_rows(index, dim), :], precision)

    def through(matrices_ref, d_matrices_ref, index, moved, cotangent):
        """Past the product ``M`` (``index`` of ``matrices_ref``) that moved ``moved`` on: ``dM += movedᵀ Ē``
        (atomic), and the cotangent before it, ``Ē Mᵀ``  [C, D]."""
        rows = block_rows(index, dim)
        pltriton.atomic_add(d_matrices_ref, (rows, slice(None)), contract(moved, cotangent, 0, 0, precision))
        return contract(cotangent, matrices_ref[rows, :], 1, 1, precision)

    def logits_cotangent(keys_source, key_block, moved, carry):
        """Key block j read from ``keys_source`` against the queries ``moved``: ``Ē += scale·dℓ_j K_j``,
        ``dG += Σ_j dℓ_j``."""
        cotangent, d_gate = carry
        key_rows = block_rows(key_block, block)
        keys = keys_source[key_rows, :]  # [C, D]
        d_logits = cotangent_of_logits(dot_transposed_rhs(moved.astype(keys.dtype), keys), key_rows, None)
        return cotangent + scale * dot(d_logits.astype(keys.dtype), keys), d_gate + jnp.sum(d_logits, axis=1)

    def moved_from_start(key_block):
        """``A_j = Q̄_n P_{n−1} … P_{j+1}`` for ``j = key_block``, product by product."""
        return jax.lax.fori_loop(0, query_block - 1 - key_block,
                                 lambda t, a: times(products_ref, query_block - 1 - t, a), queries_ref[...])

    own_superblock = query_block // superblock
    own_start = own_superblock * superblock
    before_own = moved_from_start(own_start - 1)  # X = Q̄_n P_{n−1} … P_{σS}  [C, D]
    superblock_queries_ref[...] = before_own

    def visit_superblock(index, carry):
        """Super-block τ < σ: rebuild ``X_τ``, carry ``Ē`` past ``Φ_τ``, then its key blocks with ``K̂``."""
        cotangent, d_gate = carry
        top = jax.lax.fori_loop(0, own_superblock - 1 - index,
                                lambda t, a: times(superproducts_ref, own_superblock - 1 - t, a),
                                before_own)  # X_τ  [C, D]
        carry = (through(superproducts_ref, d_superproducts_ref, index, top, cotangent), d_gate)
        return jax.lax.fori_loop(index * superblock, (index + 1) * superblock,
                                 lambda j, c: logits_cotangent(superkeys_ref, j, top, c), carry)

    def visit_own_superblock(key_block, carry):
        """Key block j of n's own super-block: carry ``Ē`` past ``P_j``, then its logits with ``K̄_j``."""
        cotangent, d_gate = carry
        moved = moved_from_start(key_block)  # A_j  [C, D]
        carry = (through(products_ref, d_products_ref, key_block, moved, cotangent), d_gate)
        return logits_cotangent(keys_ref, key_block, moved, carry)

    carry = (jnp.zeros((block, dim), jnp.float32), jnp.sum(d_own, axis=1))
    carry = jax.lax.fori_loop(0, own_superblock, visit_superblock, carry)
    d_queries, d_gate = jax.lax.fori_loop(own_start, query_block, visit_own_superblock, carry)
    d_queries_ref[...] = d_queries
    d_gate_ref[...] = d_gate


def _block_major(spec: pl.BlockSpec) -> pl.BlockSpec:
    """``spec`` (index map over the grid ``(b, h, i)``) for this kernel's grid ``(i, b, h)``."""
    return pl.BlockSpec(spec.block_shape, lambda i, b, h: spec.index_map(b, h, i))


def path_backward_queries(queries, intra, keys, superkeys, values, products, superproducts, d_out, logsumexp,
                          delta, gate=None, segments=None, *, block: int, scale: float, superblock: int,
                          interpret=None, num_warps: int | None = None, num_stages: int | None = None):
    """Query-side cotangents (module docstring).

    Inputs (``T' = N·C``): ``queries`` Q̄ ``[B, H, T', D]`` float32; ``intra`` S ``[B, H, N·C, C]`` float32;
    ``keys`` K̄ and ``values`` ``[B, G, T', D]``; ``superkeys`` K̂ ``[B, G, T'', D]`` (T'' ≥ T', carried to
    their super-block end, ``superblocks``); ``products`` ``[B, G, N·D, D]`` and ``superproducts`` Φ
    ``[B, G, ceil(N / S)·D, D]`` float32; ``d_out [B, H, T', D]`` in the values' dtype; ``logsumexp, delta
    [B, H, T']`` float32; optional ``gate [B, H, T']`` float32 and ``segments [B, T']`` int32.
    Returns ``dQ̄ [B, H, T', D]``, ``dS [B, H, N·C, C]``, ``dG [B, H, T']`` (the query side's gate cotangent),
    ``dP [B, G, N·D, D]``, ``dΦ`` (shaped like Φ) and the queries at their super-block's start ``X [B, H, T', D]``,
    all float32.
    """
    batch, heads, length, dim = queries.shape
    groups = keys.shape[1]
    heads_per_group = heads // groups
    num_blocks = length // block
    precision = kernel_precision(keys.dtype)
    kernel = functools.partial(_query_kernel, block=block, dim=dim, superblock=superblock, scale=scale,
                               precision=precision, with_gate=gate is not None, with_segments=segments is not None)

    def query_rows(i, b, h):
        return b, h, num_blocks - 1 - i, 0

    def whole_kv_head(i, b, h):
        return b, h // heads_per_group, 0, 0

    def query_vector(i, b, h):
        return b, h, num_blocks - 1 - i

    products_spec = pl.BlockSpec((None, None, num_blocks * dim, dim), whole_kv_head)
    superproducts_spec = pl.BlockSpec((None, None) + superproducts.shape[2:], whole_kv_head)
    in_specs = [
        pl.BlockSpec((None, None, block, dim), query_rows),
        pl.BlockSpec((None, None, block, block), query_rows),
        pl.BlockSpec((None, None, length, dim), whole_kv_head),
        pl.BlockSpec((None, None) + superkeys.shape[2:], whole_kv_head),
        pl.BlockSpec((None, None, length, dim), whole_kv_head),
        products_spec,
        superproducts_spec,
        pl.BlockSpec((None, None, block, dim), query_rows),
        pl.BlockSpec((None, None, block), query_vector),
        pl.BlockSpec((None, None, block), query_vector),
    ]
    extra_specs, optional = optional_specs(gate, segments, length, lambda b, h, i: (b, h, 0))
    in_specs += [_block_major(spec) for spec in extra_specs] + [products_spec, superproducts_spec]
    zeros = [jnp.zeros(x.shape, jnp.float32) for x in (products, superproducts)]  # the atomic sums start here
    operands = (queries, intra, keys, superkeys, values, products, superproducts, d_out, logsumexp, delta, *optional,
                *zeros)
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, block, dim), query_rows),
            pl.BlockSpec((None, None, block, block), query_rows),
            pl.BlockSpec((None, None, block), query_vector),
            products_spec,
            superproducts_spec,
            pl.BlockSpec((None, None, block, dim), query_rows),
        ],
        out_shape=[jax.ShapeDtypeStruct(queries.shape, jnp.float32),
                   jax.ShapeDtypeStruct(intra.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
                   jax.ShapeDtypeStruct(products.shape, jnp.float32),
                   jax.ShapeDtypeStruct(superproducts.shape, jnp.float32),
                   jax.ShapeDtypeStruct(queries.shape, jnp.float32)],
        input_output_aliases={len(operands) - 2: 3, len(operands) - 1: 4},
        **launch_options(interpret, num_warps, num_stages),
        name="path_backward_queries",
    )(*operands)
