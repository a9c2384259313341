"""PaTH backward, key side: one program per (batch, query head, key block m) computes that head's share of
the cotangents of the block's keys at the block end ``K̄_m`` and at their super-block's end ``K̂_m``, its values
and its key-side gates (``kernel_bwd`` module docstring gives the equations; ``superblocks`` the super-block
terms, ``kernel_bwd_query`` the query frames).

The program visits the query blocks n > m left to right. Those of m's own super-block τ (S key blocks per
super-block) see key block m through the block products between them, ``ℓ_nm = scale · Q̄_n M_n K̄_mᵀ + G_n −
G_m`` with ``M_n = P_{n−1} … P_{m+1}`` (``M_{m+1} = I``, ``M_{n+1} = P_n M_n``), so the program carries the
``[D, D]`` float32 ``M_n``:

    K_n = K̄_m M_nᵀ,   dV_m += p_nmᵀ dO_n,   dK̄_m += scale · (dℓ_nmᵀ Q̄_n) M_n,   dG_m −= Σ_i dℓ_nm.

The query blocks n of a later super-block σ see it through their queries at the start of σ (``X_n``, written by
the query side) and the super-block products between, ``ℓ_nm = scale · X_n Φ_{σ−1} … Φ_{τ+1} K̂_mᵀ + …``: the
program carries ``N_σ = Φ_{σ−1} … Φ_{τ+1}`` (one ``[D, D]`` product per super-block, not per query block),

    K_σ = K̂_m N_σᵀ,   dK̂_m += scale · (Σ_{n∈σ} dℓ_nmᵀ X_n) N_σ,

plus its own block's probabilities (``dV_m``, ``dG_m``) from the intra-block logits. The query heads of one
KV head write separate rows; the caller sums them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.path.kernel_bwd_common import (block_rows, causal_mask, contract, dot, dot_transposed_rhs,
                                                   gated_logits, identity, logit_cotangent)
from pallas_kernels.path.kernel_fwd import kernel_precision, optional_specs
from pallas_kernels.ssd.common import launch_options


def _key_kernel(*refs, block: int, dim: int, num_blocks: int, superblock: int, scale: float, precision,
                with_gate: bool, with_segments: bool):
    """One key block: its own query block, the later query blocks of its super-block, then the later
    super-blocks, left to right."""
    (queries_ref, superblock_queries_ref, intra_ref, keys_ref, superkeys_ref, values_ref, products_ref,
     superproducts_ref, d_out_ref, logsumexp_ref, delta_ref, *optional, d_keys_ref, d_superkeys_ref, d_values_ref,
     d_gate_ref) = refs
    gate_ref = optional.pop(0) if with_gate else None
    segments_ref = optional.pop(0) if with_segments else None
    key_block = pl.program_id(2)  # the longest scans (first key blocks) start first
    own = block_rows(key_block, block)
    keys, values = keys_ref[...], values_ref[...]  # K̄_m, V_m  [C, D]

    def probabilities_and_cotangent(raw, query_rows, visible):
        """(``p``, ``dℓ``) ``[C, C]`` of the queries in ``query_rows`` against this key block, and their dO."""
        logits = gated_logits(raw, scale, gate_ref[query_rows] if with_gate else None,
                              gate_ref[own] if with_gate else None,
                              segments_ref[query_rows] if with_segments else None,
                              segments_ref[own] if with_segments else None, visible)
        d_out = d_out_ref[query_rows, :]  # [C, D]
        probabilities, d_logits = logit_cotangent(logits, logsumexp_ref[query_rows], delta_ref[query_rows], d_out,
                                                  values)
        return probabilities, d_logits, d_out

    probabilities, d_logits, d_out = probabilities_and_cotangent(intra_ref[...], own, causal_mask(block))
    d_values = contract(probabilities.astype(d_out.dtype), d_out, 0, 0)  # pᵀ dO  [C, D]
    d_gate = -jnp.sum(d_logits, axis=0)  # [C]

    def meet(queries_source, query_block, moved_keys, carry):
        """Query block n (its queries read from ``queries_source``) against ``moved_keys [C, D]``: ``dV``,
        ``dG`` updates; returns them with ``dℓᵀ Q_n [C, D]``."""
        d_values, d_gate = carry
        query_rows = block_rows(query_block, block)
        queries = queries_source[query_rows, :]  # [C, D] float32
        raw = dot_transposed_rhs(queries.astype(keys.dtype), moved_keys.astype(keys.dtype))  # [C, C]
        probabilities, d_logits, d_out = probabilities_and_cotangent(raw, query_rows, None)
        d_values = d_values + contract(probabilities.astype(d_out.dtype), d_out, 0, 0)
        # dℓᵀ Q_n in the keys' dtype (like the logits; float32 accumulation): on an H100 the key side took
        # 37.8 / 134.3 ms at 32 x 4096 x 32 x 64 / 4 x 16384 x 16 x 128 this way, 47.2 / 176.8 with TF32.
        d_moved = contract(d_logits.astype(keys.dtype), queries.astype(keys.dtype), 0, 0)  # [C, D]
        return (d_values, d_gate - jnp.sum(d_logits, axis=0)), d_moved

    def visit_own_superblock(query_block, carry):
        """Query block n of m's super-block: ``dV``, ``dK̄``, ``dG`` updates, then ``M ← P_n M``."""
        d_keys, mixing, sums = carry
        moved_keys = contract(keys.astype(jnp.float32), mixing, 1, 1, precision)  # K̄_m M_nᵀ  [C, D]
        sums, d_moved = meet(queries_ref, query_block, moved_keys, sums)
        d_keys = d_keys + scale * dot(d_moved, mixing, precision)
        return d_keys, dot(products_ref[block_rows(query_block, dim), :], mixing, precision), sums

    def visit_superblock(index, carry):
        """Later super-block σ: its query blocks against ``K̂_m N_σᵀ``, ``dK̂`` update, then ``N ← Φ_σ N``."""
        d_superkeys, mixing, sums = carry
        moved_keys = contract(superkeys.astype(jnp.float32), mixing, 1, 1, precision)  # K̂_m N_σᵀ  [C, D]

        def visit(query_block, inner):
            sums, d_moved = inner
            sums, d_more = meet(superblock_queries_ref, query_block, moved_keys, sums)
            return sums, d_moved + d_more

        first = index * superblock
        sums, d_moved = jax.lax.fori_loop(first, jnp.minimum(first + superblock, num_blocks), visit,
                                          (sums, jnp.zeros((block, dim), jnp.float32)))
        d_superkeys = d_superkeys + scale * dot(d_moved, mixing, precision)
        return d_superkeys, dot(superproducts_ref[block_rows(index, dim), :], mixing, precision), sums

    own_superblock = key_block // superblock
    own_end = jnp.minimum((own_superblock + 1) * superblock, num_blocks)
    superkeys = superkeys_ref[...]  # K̂_m  [C, D]
    zeros = jnp.zeros((block, dim), jnp.float32)
    d_keys, _, sums = jax.lax.fori_loop(key_block + 1, own_end, visit_own_superblock,
                                        (zeros, identity(dim), (d_values, d_gate)))
    d_superkeys, _, (d_values, d_gate) = jax.lax.fori_loop(own_superblock + 1, -(-num_blocks // superblock),
                                                           visit_superblock, (zeros, identity(dim), sums))
    d_keys_ref[...] = d_keys
    d_superkeys_ref[...] = d_superkeys
    d_values_ref[...] = d_values
    d_gate_ref[...] = d_gate


def path_backward_keys(queries, superblock_queries, intra, keys, superkeys, values, products, superproducts, d_out,
                       logsumexp, delta, gate=None, segments=None, *, block: int, superblock: int, scale: float,
                       interpret=None, num_warps: int | None = None, num_stages: int | None = None):
    """Key-side cotangents per query head (module docstring); inputs as in
    ``kernel_bwd_query.path_backward_queries`` plus its queries at their super-block's start
    ``superblock_queries [B, H, T', D]`` float32. Returns ``dK̄, dK̂, dV [B, H, T', D]`` and the key side's gate
    cotangent ``dG [B, H, T']``, float32 (sum the heads of a KV head for its ``dK̄, dK̂, dV``)."""
    batch, heads, length, dim = queries.shape
    groups = keys.shape[1]
    heads_per_group = heads // groups
    num_blocks = length // block
    precision = kernel_precision(keys.dtype)
    kernel = functools.partial(_key_kernel, block=block, dim=dim, num_blocks=num_blocks, superblock=superblock,
                               scale=scale, precision=precision, with_gate=gate is not None,
                               with_segments=segments is not None)

    def own_rows(b, h, i):
        return b, h, i, 0

    def kv_rows(b, h, i):
        return b, h // heads_per_group, i, 0

    def whole_head(b, h, i):
        return b, h, 0, 0

    def whole_kv_head(b, h, i):
        return b, h // heads_per_group, 0, 0

    def whole_vector(b, h, i):
        return b, h, 0

    in_specs = [
        pl.BlockSpec((None, None, length, dim), whole_head),
        pl.BlockSpec((None, None, length, dim), whole_head),
        pl.BlockSpec((None, None, block, block), own_rows),
        pl.BlockSpec((None, None, block, dim), kv_rows),
        pl.BlockSpec((None, None, block, dim), kv_rows),
        pl.BlockSpec((None, None, block, dim), kv_rows),
        pl.BlockSpec((None, None, num_blocks * dim, dim), whole_kv_head),
        pl.BlockSpec((None, None) + superproducts.shape[2:], whole_kv_head),
        pl.BlockSpec((None, None, length, dim), whole_head),
        pl.BlockSpec((None, None, length), whole_vector),
        pl.BlockSpec((None, None, length), whole_vector),
    ]
    extra_specs, optional = optional_specs(gate, segments, length, whole_vector)
    in_specs += extra_specs
    rows_spec = pl.BlockSpec((None, None, block, dim), own_rows)
    rows_shape = jax.ShapeDtypeStruct((batch, heads, length, dim), jnp.float32)
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, num_blocks),
        in_specs=in_specs,
        out_specs=[rows_spec, rows_spec, rows_spec, pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))],
        out_shape=[rows_shape, rows_shape, rows_shape, jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
        **launch_options(interpret, num_warps, num_stages),
        name="path_backward_keys",
    )(queries, superblock_queries, intra, keys, superkeys, values, products, superproducts, d_out, logsumexp, delta,
      *optional)
