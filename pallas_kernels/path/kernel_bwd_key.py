"""PaTH backward, key side: one program per (batch, query head, key block m) computes that head's share of
the cotangents of the block's keys at the block end ``K̄_m``, its values and its key-side gates
(``kernel_bwd`` module docstring gives the equations).

The program visits the query blocks n > m left to right. Query block n sees key block m through the
products between them, ``ℓ_nm = scale · Q̄_n M_n K̄_mᵀ + G_n − G_m`` with ``M_n = P_{n−1} … P_{m+1}``
(``M_{m+1} = I``, ``M_{n+1} = P_n M_n``), so the program carries the ``[D, D]`` float32 ``M_n``:

    K_n = K̄_m M_nᵀ,   dV_m += p_nmᵀ dO_n,   dK̄_m += scale · (dℓ_nmᵀ Q̄_n) M_n,   dG_m −= Σ_i dℓ_nm,

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


def _key_kernel(*refs, block: int, dim: int, num_blocks: int, scale: float, precision, with_gate: bool,
                with_segments: bool):
    """One key block: its own query block, then the later query blocks left to right."""
    (queries_ref, intra_ref, keys_ref, values_ref, products_ref, d_out_ref, logsumexp_ref, delta_ref,
     *optional, d_keys_ref, d_values_ref, d_gate_ref) = refs
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

    def visit_query_block(query_block, carry):
        """Query block n: ``dV``, ``dK̄``, ``dG`` updates, then ``M ← P_n M``."""
        d_keys, d_values, d_gate, mixing = carry
        query_rows = block_rows(query_block, block)
        queries = queries_ref[query_rows, :]  # Q̄_n  [C, D] float32
        moved_keys = contract(keys.astype(jnp.float32), mixing, 1, 1, precision)  # K̄_m M_nᵀ  [C, D]
        raw = dot_transposed_rhs(queries.astype(keys.dtype), moved_keys.astype(keys.dtype))  # [C, C]
        probabilities, d_logits, d_out = probabilities_and_cotangent(raw, query_rows, None)
        d_values = d_values + contract(probabilities.astype(d_out.dtype), d_out, 0, 0)
        d_gate = d_gate - jnp.sum(d_logits, axis=0)
        d_moved = contract(d_logits, queries, 0, 0, precision)  # dℓᵀ Q̄_n  [C, D]
        d_keys = d_keys + scale * dot(d_moved, mixing, precision)
        mixing = dot(products_ref[block_rows(query_block, dim), :], mixing, precision)  # P_n M_n  [D, D]
        return d_keys, d_values, d_gate, mixing

    carry = (jnp.zeros((block, dim), jnp.float32), d_values, d_gate, identity(dim))
    d_keys, d_values, d_gate, _ = jax.lax.fori_loop(key_block + 1, num_blocks, visit_query_block, carry)
    d_keys_ref[...] = d_keys
    d_values_ref[...] = d_values
    d_gate_ref[...] = d_gate


def path_backward_keys(queries, intra, keys, values, products, d_out, logsumexp, delta, gate=None, segments=None,
                       *, block: int, scale: float, interpret=None, num_warps: int | None = None,
                       num_stages: int | None = None):
    """Key-side cotangents per query head (module docstring); inputs as in
    ``kernel_bwd_query.path_backward_queries``. Returns ``dK̄, dV [B, H, T', D]`` and the key side's gate
    cotangent ``dG [B, H, T']``, float32 (sum the heads of a KV head for its ``dK̄, dV``)."""
    batch, heads, length, dim = queries.shape
    groups = keys.shape[1]
    heads_per_group = heads // groups
    num_blocks = length // block
    precision = kernel_precision(keys.dtype)
    kernel = functools.partial(_key_kernel, block=block, dim=dim, num_blocks=num_blocks, scale=scale,
                               precision=precision, with_gate=gate is not None, with_segments=segments is not None)

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
        pl.BlockSpec((None, None, block, block), own_rows),
        pl.BlockSpec((None, None, block, dim), kv_rows),
        pl.BlockSpec((None, None, block, dim), kv_rows),
        pl.BlockSpec((None, None, num_blocks * dim, dim), whole_kv_head),
        pl.BlockSpec((None, None, length, dim), whole_head),
        pl.BlockSpec((None, None, length), whole_vector),
        pl.BlockSpec((None, None, length), whole_vector),
    ]
    extra_specs, optional = optional_specs(gate, segments, length, whole_vector)
    in_specs += extra_specs
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, num_blocks),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, block, dim), own_rows),
            pl.BlockSpec((None, None, block, dim), own_rows),
            pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, length, dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, length, dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
        **launch_options(interpret, num_warps, num_stages),
        name="path_backward_keys",
    )(queries, intra, keys, values, products, d_out, logsumexp, delta, *optional)
