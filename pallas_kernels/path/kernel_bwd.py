"""PaTH backward on Pallas kernels (FlashAttention-2 style, no T² buffers).

The forward is a function of the per-block terms of ``jaxlm.ops.path_blockwise`` (queries at the block start
``Q̄``, intra-block logits ``S``, keys at the block end ``K̄``, values ``V``, block products ``P`` and the
cumulative gates ``G``). With the saved log-sum-exp ``L`` and ``Δ_i = dO_i · O_i`` every logit's cotangent is
``dℓ_ij = p_ij (dO_i · v_j − Δ_i)`` (``kernel_bwd_common``). The cotangents of the terms are then

- ``dS_n = scale · dℓ_nn`` (own block, causal) and ``dG_i = Σ_j dℓ_ij − Σ_j dℓ_ji``;
- ``dV_m = Σ_{n≥m} p_nmᵀ dO_n``;
- ``dK̄_m = scale · Σ_{n>m} dℓ_nmᵀ Q̄_n P_{n−1} … P_{m+1}`` (``kernel_bwd_key``: per key block, left to right);
- ``dQ̄_n`` and ``dP_j`` from the chain of moved queries (``kernel_bwd_query``: per query block).

Both kernels meet the key blocks of earlier super-blocks (S consecutive blocks) through the keys carried to
their super-block end ``K̂`` and the super-block products ``Φ`` (``superblocks``): the per-block products then
run once per super-block instead of once per block pair, and ``dK̂``, ``dΦ`` are pulled back to ``dK̄``, ``dP``.

They are pulled back to q, k, v, w, β and the forget gate through the per-block precomputation (UT
transform, carried keys, intra-block terms, gate cumulative sum) by ``jax.vjp`` of
``jaxlm.ops.path_blockwise.blockwise_terms``: O(T·C·D + T·D²) XLA work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.path_blockwise import BlockwiseTerms, blockwise_terms, segment_blocks
from pallas_kernels.path.blocks import PathBlocks, superblock_or_default
from pallas_kernels.path.kernel_bwd_key import path_backward_keys
from pallas_kernels.path.kernel_bwd_query import path_backward_queries
from pallas_kernels.path.kernel_prep import path_query_terms
from pallas_kernels.path.kernel_terms_bwd import path_terms_backward
from pallas_kernels.path.layout import cumulative_gate, head_major, head_major_tokens, kernel_layout, time_major
from pallas_kernels.path.superblocks import keys_to_superblock_end, superblock_keys_kernel, superblock_keys_pullback


def group_sum(x: jax.Array, groups: int) -> jax.Array:
    """``[B, H, ...]`` -> ``[B, G, ...]``: the query heads of each KV head summed."""
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:]).sum(axis=2)


def _grouped_to_head_major(x: jax.Array) -> jax.Array:
    """``[B, N, C, G, R, D]`` -> ``[B, G·R, N·C, D]``."""
    batch, num_blocks, block, groups, heads_per_group, dim = x.shape
    return x.transpose(0, 3, 4, 1, 2, 5).reshape(batch, groups * heads_per_group, num_blocks * block, dim)


def _kernel_terms(terms: BlockwiseTerms, kv_dtype):
    """The terms in the kernels' head-major layout (``kernel_bwd_query.path_backward_queries``)."""
    batch, num_blocks, block, groups, heads_per_group, dim = terms.queries_at_start.shape
    heads = groups * heads_per_group
    queries = _grouped_to_head_major(terms.queries_at_start)  # [B, H, T', D]
    intra = terms.intra_logits.transpose(0, 2, 3, 1, 4, 5).reshape(batch, heads, num_blocks * block, block)

    def per_kv_head(x):  # [B, N, C, G, D] -> [B, G, T', D]
        return x.transpose(0, 3, 1, 2, 4).reshape(batch, groups, num_blocks * block, dim).astype(kv_dtype)

    products = terms.products.transpose(0, 2, 1, 3, 4).reshape(batch, groups, num_blocks * dim, dim)
    gate = terms.cumulative_gate.transpose(0, 2, 3, 1, 4).reshape(batch, heads, num_blocks * block)
    return queries, intra, per_kv_head(terms.keys_at_end), per_kv_head(terms.values), products, gate


def _blockwise_cotangents(d_queries, d_intra, d_gate, d_products, d_keys, d_values, shape) -> BlockwiseTerms:
    """Kernel-layout cotangents -> ``BlockwiseTerms`` layout (``d_keys`` per KV head; the query heads of a KV
    head summed for V)."""
    batch, num_blocks, block, groups, heads_per_group, dim = shape

    def to_grouped(x):  # [B, H, T', D] -> [B, N, C, G, R, D]
        x = x.reshape(batch, groups, heads_per_group, num_blocks, block, dim)
        return x.transpose(0, 3, 4, 1, 2, 5)

    intra = d_intra.reshape(batch, groups, heads_per_group, num_blocks, block, block).transpose(0, 3, 1, 2, 4, 5)
    gate = d_gate.reshape(batch, groups, heads_per_group, num_blocks, block).transpose(0, 3, 1, 2, 4)
    products = d_products.reshape(batch, groups, num_blocks, dim, dim).transpose(0, 2, 1, 3, 4)
    values = to_grouped(d_values).sum(axis=4)  # [B, N, C, G, D]
    keys = d_keys.reshape(batch, groups, num_blocks, block, dim).transpose(0, 2, 3, 1, 4)  # [B, N, C, G, D]
    return BlockwiseTerms(to_grouped(d_queries), intra, keys, values, products, gate)


def path_backward(scale: float, blocks: PathBlocks, interpret, residuals, d_out, superblock: int | None = None,
                  block_terms=None):
    """Exact input cotangents ``(dq, dk, dv, dw, dβ, dlog_f, None)`` of PaTH attention on the backward kernels.

    ``residuals = (q, k, v, w, beta, log_f, segment_ids, out, logsumexp)`` with the forward kernel's float32
    ``out [B, H, T', D]`` and ``logsumexp [B, H, N, C]``; ``d_out [B, T, H, D]``. ``superblock`` None picks
    ``blocks.default_superblock``. The block terms are rebuilt and pulled back by kernels (``blocks.terms_backward ==
    "kernel"``: ``kernel_layout``'s terms, ``kernel_prep.path_query_terms``, ``kernel_terms_bwd``) or by
    ``jax.vjp`` of the XLA ``blockwise_terms`` (``"xla"``). ``block_terms``: the forward's per-KV-head terms
    ``(𝒯, k̄, P)`` in the kernel layout when it saved them (``PathBlocks.save_block_terms``), used by the kernel
    path instead of running the preprocessing again.
    """
    q, k, v, w, beta, log_f, segment_ids, out, logsumexp = residuals
    if blocks.terms_backward == "xla":
        terms, pullback = jax.vjp(functools.partial(blockwise_terms, block_size=blocks.block), q, k, v, w, beta,
                                  log_f)
        kv_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
        queries, intra, keys, values, products, gate = _kernel_terms(terms, kv_dtype)
        cotangents = _term_cotangents(scale, blocks, interpret, residuals, d_out, superblock, queries, intra, keys,
                                      values, products, gate if log_f is not None else None)
        d_terms = _blockwise_cotangents(*cotangents, terms.queries_at_start.shape)
        d_terms = jax.tree.map(lambda d, t: d.astype(t.dtype), d_terms, terms)
        return (*pullback(d_terms), None)
    return _backward_with_terms_kernels(scale, blocks, interpret, residuals, d_out, superblock, block_terms)


def _term_cotangents(scale, blocks: PathBlocks, interpret, residuals, d_out, superblock, queries, intra, keys,
                     values, products, gate):
    """The query-side and key-side kernels: cotangents of the block terms ``(dQ̄ [B, H, T', D], dS [B, H, N·C,
    C], dG [B, H, T'], dP [B, G, N·D, D], dK̄ [B, G, T', D], dV [B, H, T', D])``, float32, from the terms in the
    kernels' layout (``gate`` None: no forget gate). The kernels meet earlier super-blocks through the keys
    carried to their super-block end (``superblocks``); the cotangents of those and of the super-block products
    are pulled back to ``dK̄`` and ``dP`` (``_superblock_terms``)."""
    q, k, v, _, _, _, segment_ids, out, logsumexp = residuals
    batch, length, heads, dim = q.shape
    groups = k.shape[2]
    block = blocks.block
    kv_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    d_out_heads = head_major(d_out, block)  # [B, H, T', D]
    delta = jnp.sum(d_out_heads.astype(jnp.float32) * out, axis=-1)  # Δ_i = dO_i · O_i  [B, H, T']
    segments = None
    if segment_ids is not None:
        segments = segment_blocks(segment_ids, batch, length, block).reshape(batch, -1)  # [B, T']
    num_blocks = products.shape[2] // dim
    superblock = superblock_or_default(superblock, num_blocks)
    superkeys, superproducts, pullback = _superblock_terms(keys, products, superblock, blocks, interpret)
    settings = dict(block=block, scale=scale, superblock=superblock, interpret=interpret,
                    num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    shared = (d_out_heads.astype(kv_dtype), logsumexp.reshape(batch, heads, -1), delta, gate, segments)
    d_queries, d_intra, d_query_gate, d_products, d_superproducts, superblock_queries = path_backward_queries(
        queries, intra, keys, superkeys, values, products, superproducts, *shared, **settings)
    d_keys, d_superkeys, d_values, d_key_gate = path_backward_keys(
        queries, superblock_queries, intra, keys, superkeys, values, products, superproducts, *shared, **settings)

    d_keys_through, d_products_through = pullback(group_sum(d_superkeys, groups), d_superproducts)
    return (d_queries, d_intra, d_query_gate + d_key_gate, d_products + d_products_through,
            group_sum(d_keys, groups) + d_keys_through, d_values)


def _superblock_terms(keys, products, superblock: int, blocks: PathBlocks, interpret):
    """``(K̂, Φ, pullback)``: the keys carried to their super-block end in the keys' dtype, the super-block
    products and ``pullback(dK̂, dΦ) -> (dK̄, dP)``, float32, on the kernels of ``superblocks`` (with
    ``blocks.terms_backward == "kernel"``) or by ``jax.vjp`` of the XLA form."""
    if blocks.terms_backward == "kernel":
        launch = dict(interpret=interpret, num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        superkeys, superproducts, suffixes = superblock_keys_kernel(keys, products, superblock, with_suffixes=True,
                                                                    **launch)

        def pullback(d_superkeys, d_superproducts):
            return superblock_keys_pullback(keys, products, suffixes, d_superkeys, d_superproducts, superblock,
                                            **launch)

        return superkeys, superproducts, pullback
    (superkeys, superproducts), vjp = jax.vjp(lambda x, p: keys_to_superblock_end(x, p, superblock),
                                              keys.astype(jnp.float32), products)
    return superkeys.astype(keys.dtype), superproducts, lambda *cotangents: vjp(cotangents)


def _backward_with_terms_kernels(scale, blocks: PathBlocks, interpret, residuals, d_out, superblock, block_terms):
    """``path_backward`` with the block terms and their pullback on kernels:

        dq, dk, dw, dβ = kernel_terms_bwd(dQ̄, dS, Σ_r dK̄_r, dP),   dv = Σ_r dV_r,   dlog_f_t = Σ_{t' ≥ t} dG_t'

    (``r`` the query heads of a KV head; the gate is the cumulative sum of the log forget gates)."""
    q, k, v, w, beta, log_f, _, _, _ = residuals
    length, groups = q.shape[1], k.shape[2]
    block = blocks.block
    q_heads, k_heads, w_heads, transform, keys, values, products = kernel_layout(q, k, v, w, beta, blocks,
                                                                                 block_terms)
    launch = dict(interpret=interpret, num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    queries, intra = path_query_terms(q_heads, k_heads, w_heads, transform, block=block, **launch)
    d_queries, d_intra, d_gate, d_products, d_keys, d_values = _term_cotangents(
        scale, blocks, interpret, residuals, d_out, superblock, queries, intra, keys, values, products,
        cumulative_gate(log_f, block))

    beta_heads = head_major_tokens(beta, block)  # [B, G, T']
    dq, dk, dw, d_beta = path_terms_backward(q_heads, k_heads, w_heads, beta_heads, transform, d_queries, d_intra,
                                             d_keys, d_products, block=block,
                                             float32_dots=blocks.float32_dots, **launch)

    d_log_f = None
    if log_f is not None:
        d_log_f = jax.lax.cumsum(time_major(d_gate, length, jnp.float32), axis=1, reverse=True).astype(log_f.dtype)
    return (time_major(dq, length, q.dtype), time_major(dk, length, k.dtype),
            time_major(group_sum(d_values, groups), length, v.dtype), time_major(dw, length, w.dtype),
            time_major(d_beta, length, beta.dtype), d_log_f, None)
