"""Blockwise PaTH attention with a custom backward pass whose memory is linear in T.

Plain autodiff through the forward scan of ``jaxlm.ops.path_blockwise`` keeps the moved queries of every
query block at every step: O(T²/C · D). Here the forward saves only its inputs, its output O and the
per-query logsumexp ``L_i``; the backward uses the FlashAttention identity: with ``P_ij = exp(ℓ_ij − L_i)``
(ℓ the masked, scaled, gated logits), upstream cotangent ``dO`` and ``Δ_i = dO_i · O_i``,

    dℓ_ij = P_ij (dO_i · v_j − Δ_i),   dv_j = Σ_i P_ij dO_i,

which are exactly the gradients of the scalar surrogate ``Σ_ij P_ij (dO_i · v_j − Δ_i)`` when ``L`` and
``Δ`` are held fixed. The query blocks are taken in groups of S: for one group, the surrogate is rebuilt
by a scan over its key blocks right to left that carries only the group's moved queries ``[S·C, D]``, and
is differentiated with ``jax.grad`` (residuals O(S·T·D)). Its cotangents for the shared per-block terms
(K̄, V, block products P, gates) are summed over groups, then pulled back once through the shared precomputation
(UT transform, carried keys, intra-block logits). The Householder products cannot be inverted (β = 1 is
singular), so each group's query chain is recomputed rather than run backwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.path_blockwise import (BlockwiseTerms, blocks_to_sequence, blockwise_forward, blockwise_terms,
                                      masked_block_logits, move_queries_past_block, segment_blocks, to_blocks)


def path_attention_linear_memory(q, k, v, w, beta, log_f, segment_ids, scale: float, block_size: int,
                                 group_size: int) -> jax.Array:
    """Blockwise PaTH attention (arguments as in ``jaxlm.ops.path.path_attention``, already validated)
    whose gradient takes O(group_size · C · T · D) memory; ``group_size`` query blocks share one backward
    scan. Output ``[B, T, H, D]`` in q's dtype, equal to ``blockwise_path_attention``."""
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    return _linear_memory_attention(scale, block_size, group_size, q, k, v, w, beta, log_f, segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _linear_memory_attention(scale, block_size, group_size, q, k, v, w, beta, log_f, segment_ids):
    out, _ = _forward(scale, block_size, group_size, q, k, v, w, beta, log_f, segment_ids)
    return out


def _forward(scale, block_size, group_size, q, k, v, w, beta, log_f, segment_ids):
    """The all-blocks-in-parallel forward; residuals are the inputs, the output and the logsumexp."""
    terms = blockwise_terms(q, k, v, w, beta, log_f, block_size)
    segments = segment_blocks(segment_ids, *q.shape[:2], block_size)  # [B, N, C]
    out_blocks, logsumexp = blockwise_forward(terms, segments, scale)  # [B, N, G, R, C, D], [B, N, G, R, C]
    out = blocks_to_sequence(out_blocks, q.shape[1]).astype(q.dtype)
    return out, (q, k, v, w, beta, log_f, segment_ids, out_blocks, logsumexp)


def linear_memory_backward(scale, block_size, group_size, residuals, d_out):
    """Exact input cotangents: grouped surrogate gradients for the shared terms, then one pullback."""
    q, k, v, w, beta, log_f, segment_ids, out_blocks, logsumexp = residuals
    terms, pullback = jax.vjp(functools.partial(blockwise_terms, block_size=block_size), q, k, v, w, beta, log_f)
    segments = segment_blocks(segment_ids, *q.shape[:2], block_size)  # [B, N, C]
    batch_size, num_blocks, num_groups, heads_per_group, _, dim = out_blocks.shape
    grouped = (batch_size, q.shape[1], num_groups, heads_per_group, dim)
    d_out_blocks = jnp.moveaxis(to_blocks(d_out.astype(out_blocks.dtype).reshape(grouped), block_size), 2, 4)
    delta = jnp.sum(d_out_blocks * out_blocks, axis=-1)  # Δ_i = dO_i · O_i  [B, N, G, R, C]
    d_terms = grouped_terms_cotangents(terms, segments, logsumexp, d_out_blocks, delta, scale, group_size)
    return (*pullback(d_terms), None)


_linear_memory_attention.defvjp(_forward, linear_memory_backward)


def grouped_terms_cotangents(terms: BlockwiseTerms, segments, logsumexp, d_out, delta, scale: float,
                             group_size: int) -> BlockwiseTerms:
    """Cotangents of the shared blockwise terms, summed over groups of ``group_size`` query blocks.

    ``segments [B, N, C]``; ``logsumexp, delta [B, N, G, R, C]``; ``d_out [B, N, G, R, C, D]``. A scan over
    the groups carries the key-side cotangents (they collect contributions from every later query block)
    and stacks the query-side ones (each query block belongs to one group).
    """
    num_blocks = segments.shape[1]
    group_size = min(group_size, num_blocks)
    num_query_groups = -(-num_blocks // group_size)

    def by_group(x, fill=0):
        """``[B, N, ...]`` -> ``[num_query_groups, B, S, ...]``, padded with whole query blocks of ``fill``."""
        padding = [(0, 0)] * x.ndim
        padding[1] = (0, num_query_groups * group_size - num_blocks)
        x = jnp.pad(x, padding, constant_values=fill)
        return jnp.moveaxis(x.reshape(x.shape[0], num_query_groups, group_size, *x.shape[2:]), 1, 0)

    def ungroup(x):
        """Inverse of ``by_group`` (padding blocks dropped)."""
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :num_blocks]

    key_side = (terms.keys_at_end, terms.values, terms.products, terms.cumulative_gate)
    query_side = (terms.queries_at_start, terms.intra_logits, terms.cumulative_gate)
    surrogate_gradient = jax.grad(group_surrogate, argnums=(0, 1))

    def add_group(key_cotangents, group):
        first_block, query_terms, constants = group
        query_grads, key_grads = surrogate_gradient(query_terms, key_side, first_block, constants, segments, scale)
        return jax.tree.map(jnp.add, key_cotangents, key_grads), query_grads

    first_blocks = jnp.arange(num_query_groups) * group_size
    query_constants = (by_group(segments, fill=-2), by_group(logsumexp), by_group(d_out), by_group(delta))
    zeros = jax.tree.map(jnp.zeros_like, key_side)
    key_cotangents, query_cotangents = jax.lax.scan(
        add_group, zeros, (first_blocks, tuple(by_group(x) for x in query_side), query_constants))
    d_queries, d_intra, d_query_gate = (ungroup(x) for x in query_cotangents)
    d_keys, d_values, d_products, d_key_gate = key_cotangents
    return BlockwiseTerms(d_queries, d_intra, d_keys, d_values, d_products, d_key_gate + d_query_gate)


def group_surrogate(query_terms, key_terms, first_block, constants, segments, scale: float) -> jax.Array:
    """``Σ_ij P_ij (dO_i · v_j − Δ_i)`` over the queries i of one group of S query blocks (module docstring).

    ``query_terms = (Q̄, S, G)`` of the group: ``[B, S, C, G, R, D]``, ``[B, S, G, R, C, C]``,
    ``[B, S, G, R, C]``; ``key_terms = (K̄, V, P, G)`` of all N blocks; ``constants = (segments,
    logsumexp, dO, Δ)`` of the group. Block ``first_block + s`` of the group visits key blocks right to left
    (offset d pairs it with key block ``first_block + s − d``), moving its queries past each one after use.
    """
    queries, intra_logits, query_gate = query_terms
    keys_at_end, values, products, key_gate = key_terms
    query_segments, logsumexp, d_out, delta = constants
    num_blocks, block_size = segments.shape[1:]
    group_size = queries.shape[1]
    blocks = first_block + jnp.arange(group_size)  # [S]; may run past N − 1 in the last group

    def weighted_probabilities(logits, block_values):
        """``Σ P_ij (dO_i · v_j − Δ_i)`` for ``logits [B, S, G, R, C, C']``, ``block_values [B, S, C', G, D]``."""
        probabilities = jnp.exp(logits - logsumexp[..., None])  # [B, S, G, R, C, C']
        value_products = jnp.einsum("bngrcd,bnjgd->bngrcj", d_out, block_values)  # dO_i · v_j
        return jnp.sum(probabilities * (value_products - delta[..., None]))

    own = jnp.minimum(blocks, num_blocks - 1)  # [S]
    causal = jnp.tril(jnp.ones((block_size, block_size), bool))
    diagonal = masked_block_logits(intra_logits, query_segments, query_segments, query_gate, query_gate, causal,
                                   scale)  # [B, S, G, R, C, C]
    total = weighted_probabilities(diagonal, values[:, own])

    offsets = jnp.arange(1, num_blocks)  # [N − 1]
    sources = blocks[None, :] - offsets[:, None]  # [N − 1, S]
    exists = (sources >= 0) & (blocks < num_blocks)[None, :]  # [N − 1, S]
    sources = jnp.clip(sources, 0, num_blocks - 1)
    per_offset = tuple(jnp.moveaxis(x[:, sources], 1, 0) for x in
                       (keys_at_end, values, products, key_gate, segments))  # [N − 1, B, S, ...]

    @jax.checkpoint
    def visit_key_block(carry, inputs):
        """Queries meet key block ``n − d`` and then move past its product (skipped once no pair exists)."""
        offset, visible, block_keys, block_values, block_products, block_gate, block_segments = inputs

        def visit(carry):
            queries, total = carry
            raw = jnp.einsum("bncgrd,bnjgd->bngrcj", queries, block_keys)  # [B, S, G, R, C, C']
            logits = masked_block_logits(raw, query_segments, block_segments, query_gate, block_gate,
                                         visible[None, :, None, None, None, None], scale)
            total = total + weighted_probabilities(logits, block_values)
            return move_queries_past_block(queries, block_products), total

        return jax.lax.cond(offset < first_block + group_size, visit, lambda carry: carry, carry), None

    if num_blocks > 1:
        (_, total), _ = jax.lax.scan(visit_key_block, (queries, total), (offsets, exists, *per_offset))
    return total
