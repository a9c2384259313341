"""PaTH backward, query side: one program per (batch, query head, query block n) computes the cotangents of
its queries at the block start ``Q̄_n``, of its intra-block logits ``S_n`` and of its gates, and adds its share
of every earlier block product's cotangent ``dP_j`` (``kernel_bwd`` module docstring gives the equations).

Query block n meets key block j < n with its queries moved past the later blocks' products,

    A_j = Q̄_n P_{n−1} … P_{j+1}        (A_{n−1} = Q̄_n, A_{j−1} = A_j P_j),

so the cotangent ``Ē_j`` of ``A_j`` collects the logits of key block j and everything left of it:

    Ē_j = scale · dℓ_j K̄_j + Ē_{j−1} P_jᵀ   (Ē_{−1} = 0),   dP_j += A_jᵀ Ē_{j−1},   dQ̄_n = Ē_{n−1}.

That recursion runs left to right while the moved queries ``A_j`` are built right to left, and the products
cannot be inverted (β = 1 makes them singular), so the program rebuilds them from products precomputed per
super-block of S key blocks (``superblocks.superblock_suffixes``): block j of super-block τ (blocks τS … τS + S − 1) has
the suffix ``R_j = P_{τS+S−1} … P_{j+1}``, and the super-block the product ``Φ_τ = P_{τS+S−1} … P_{τS}``. With
``X = Q̄_n P_{n−1} … P_{σS}`` (σ = ⌊n / S⌋, the super-block of n itself),

    A_j = X Φ_{σ−1} … Φ_{τ+1} R_j      for j in a super-block τ < σ,
    A_j = Q̄_n P_{n−1} … P_{j+1}        for σS ≤ j < n,

which costs about ``n + (n / S)² / 2 + S² / 2`` ``[C, D] x [D, D]`` products per query block and, beyond the
program's tiles, only the ``R`` and ``Φ`` arrays (``N·D²`` per KV head, like the block products). Different
query blocks (and the query heads of one KV head) add into the same ``dP_j``: those adds are atomic
(``pallas.triton.atomic_add``: GPU and interpret mode; a TPU version would need another reduction). The grid
runs query blocks outermost, ``(n, batch, head)``, so programs in flight add into different heads' ``dP``: on an
H100 at 32 x 4096 x 32 x 64 this kernel took 175 ms against 207 ms with ``(batch, head, n)`` (consecutive
programs, the query blocks of one head, contend for the same ``dP_j``) and 184 ms with ``(batch, n, head)``.
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
from pallas_kernels.path.superblocks import superblock_suffixes
from pallas_kernels.ssd.common import launch_options


def _query_kernel(*refs, block: int, dim: int, superblock: int, scale: float, precision, with_gate: bool,
                  with_segments: bool):
    """One query block: its own block's logits, then key blocks left to right (module docstring)."""
    (queries_ref, intra_ref, keys_ref, values_ref, products_ref, suffixes_ref, superblock_products_ref,
     d_out_ref, logsumexp_ref, delta_ref, *optional, _, d_queries_ref, d_intra_ref, d_gate_ref,
     d_products_ref) = refs
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

    def visit_key_block(key_block, moved, carry):
        """With ``moved = A_j``: ``dP_j += A_jᵀ Ē_{j−1}``, then ``Ē_j = scale·dℓ_j K̄_j + Ē_{j−1} P_jᵀ``."""
        cotangent, d_gate = carry
        key_rows = block_rows(key_block, block)
        keys = keys_ref[key_rows, :]  # K̄_j  [C, D]
        d_logits = cotangent_of_logits(dot_transposed_rhs(moved.astype(keys.dtype), keys), key_rows, None)
        product_rows = block_rows(key_block, dim)
        pltriton.atomic_add(d_products_ref, (product_rows, slice(None)),
                            contract(moved, cotangent, 0, 0, precision))  # [D, D]
        cotangent = (scale * dot(d_logits.astype(keys.dtype), keys)
                     + contract(cotangent, products_ref[product_rows, :], 1, 1, precision))  # [C, D]
        return cotangent, d_gate + jnp.sum(d_logits, axis=1)

    def moved_from_start(key_block):
        """``Q̄_n P_{n−1} … P_{j+1}`` for ``j = key_block``, product by product."""
        return jax.lax.fori_loop(0, query_block - 1 - key_block,
                                 lambda t, a: times(products_ref, query_block - 1 - t, a), queries_ref[...])

    own_superblock = query_block // superblock
    own_start = own_superblock * superblock
    before_own = moved_from_start(own_start - 1)  # X = Q̄_n P_{n−1} … P_{σS}  [C, D]

    def visit_superblock(index, carry):
        """Super-block τ < σ: ``A_top = X Φ_{σ−1} … Φ_{τ+1}``, then ``A_j = A_top R_j`` per block."""
        top = jax.lax.fori_loop(0, own_superblock - 1 - index,
                                lambda t, a: times(superblock_products_ref, own_superblock - 1 - t, a),
                                before_own)  # [C, D]

        def visit(key_block, carry):
            return visit_key_block(key_block, times(suffixes_ref, key_block, top), carry)

        return jax.lax.fori_loop(index * superblock, (index + 1) * superblock, visit, carry)

    def visit_own_superblock(key_block, carry):
        return visit_key_block(key_block, moved_from_start(key_block), carry)

    carry = (jnp.zeros((block, dim), jnp.float32), jnp.sum(d_own, axis=1))
    carry = jax.lax.fori_loop(0, own_superblock, visit_superblock, carry)
    d_queries, d_gate = jax.lax.fori_loop(own_start, query_block, visit_own_superblock, carry)
    d_queries_ref[...] = d_queries
    d_gate_ref[...] = d_gate


def _block_major(spec: pl.BlockSpec) -> pl.BlockSpec:
    """``spec`` (index map over the grid ``(b, h, i)``) for this kernel's grid ``(i, b, h)``."""
    return pl.BlockSpec(spec.block_shape, lambda i, b, h: spec.index_map(b, h, i))


def path_backward_queries(queries, intra, keys, values, products, d_out, logsumexp, delta, gate=None,
                          segments=None, *, block: int, scale: float, superblock: int, interpret=None,
                          num_warps: int | None = None, num_stages: int | None = None):
    """Query-side cotangents (module docstring).

    Inputs (``T' = N·C``): ``queries`` Q̄ ``[B, H, T', D]`` float32; ``intra`` S ``[B, H, N·C, C]`` float32;
    ``keys`` K̄ and ``values`` ``[B, G, T', D]``; ``products`` ``[B, G, N·D, D]`` float32; ``d_out [B, H, T', D]``
    in the values' dtype; ``logsumexp, delta [B, H, T']`` float32; optional ``gate [B, H, T']`` float32 and
    ``segments [B, T']`` int32.
    Returns ``dQ̄ [B, H, T', D]``, ``dS [B, H, N·C, C]``, ``dG [B, H, T']`` (the query side's gate cotangent)
    and ``dP [B, G, N·D, D]``, all float32.
    """
    batch, heads, length, dim = queries.shape
    groups = keys.shape[1]
    heads_per_group = heads // groups
    num_blocks = length // block
    precision = kernel_precision(keys.dtype)
    kernel = functools.partial(_query_kernel, block=block, dim=dim, superblock=superblock, scale=scale,
                               precision=precision, with_gate=gate is not None, with_segments=segments is not None)
    suffixes, superblock_products = superblock_suffixes(products, superblock)

    def query_rows(i, b, h):
        return b, h, num_blocks - 1 - i, 0

    def whole_kv_head(i, b, h):
        return b, h // heads_per_group, 0, 0

    def query_vector(i, b, h):
        return b, h, num_blocks - 1 - i

    in_specs = [
        pl.BlockSpec((None, None, block, dim), query_rows),
        pl.BlockSpec((None, None, block, block), query_rows),
        pl.BlockSpec((None, None, length, dim), whole_kv_head),
        pl.BlockSpec((None, None, length, dim), whole_kv_head),
        pl.BlockSpec((None, None, num_blocks * dim, dim), whole_kv_head),
        pl.BlockSpec((None, None) + suffixes.shape[2:], whole_kv_head),
        pl.BlockSpec((None, None) + superblock_products.shape[2:], whole_kv_head),
        pl.BlockSpec((None, None, block, dim), query_rows),
        pl.BlockSpec((None, None, block), query_vector),
        pl.BlockSpec((None, None, block), query_vector),
    ]
    extra_specs, optional = optional_specs(gate, segments, length, lambda b, h, i: (b, h, 0))
    in_specs += [_block_major(spec) for spec in extra_specs]
    products_spec = pl.BlockSpec((None, None, num_blocks * dim, dim), whole_kv_head)
    in_specs.append(products_spec)
    zeros = jnp.zeros(products.shape, jnp.float32)  # the atomically accumulated dP starts here
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, block, dim), query_rows),
            pl.BlockSpec((None, None, block, block), query_rows),
            pl.BlockSpec((None, None, block), query_vector),
            products_spec,
        ],
        out_shape=[jax.ShapeDtypeStruct(queries.shape, jnp.float32),
                   jax.ShapeDtypeStruct(intra.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
                   jax.ShapeDtypeStruct(products.shape, jnp.float32)],
        input_output_aliases={10 + len(optional): 3},
        **launch_options(interpret, num_warps, num_stages),
        name="path_backward_queries",
    )(queries, intra, keys, values, products, suffixes, superblock_products, d_out, logsumexp, delta, *optional,
      zeros)
