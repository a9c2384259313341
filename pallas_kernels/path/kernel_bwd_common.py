"""Shared pieces of the PaTH backward kernels: block matmuls, masked gated logits and the softmax cotangent.

With the forward's saved log-sum-exp ``L_i``, the probabilities are recomputed as ``p_ij = exp(ℓ_ij − L_i)``
and, with ``Δ_i = dO_i · O_i``, the logit cotangent is the FlashAttention identity

    dℓ_ij = p_ij (dO_i · v_j − Δ_i).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlm.ops.path_blockwise import MASKED_LOGIT
from pallas_kernels.ssd.common import contract, dot, dot_transposed_rhs  # noqa: F401 - the kernels' products


def gated_logits(raw, scale: float, query_gate, key_gate, query_segments, key_segments, visible):
    """``scale·s_ij + G_i − G_j`` where ``visible`` (None: everywhere) and i, j share a segment,
    MASKED_LOGIT elsewhere. ``raw [C, C']``; gates ``[C]`` / ``[C']`` float32 or None (no forget gate);
    segments ``[C]`` / ``[C']`` int32 or None (one segment)."""
    logits = scale * raw  # [C, C']
    if query_gate is not None:
        logits = logits + query_gate[:, None] - key_gate[None, :]
    if query_segments is not None:
        same_segment = query_segments[:, None] == key_segments[None, :]  # [C, C']
        visible = same_segment if visible is None else visible & same_segment
    return logits if visible is None else jnp.where(visible, logits, MASKED_LOGIT)


def logit_cotangent(logits, logsumexp, delta, d_out, values):
    """(``p_ij = exp(ℓ_ij − L_i)``, ``dℓ_ij = p_ij (dO_i · v_j − Δ_i)``), both ``[C, C']`` float32, for
    ``logits [C, C']``, ``logsumexp, delta [C]``, ``d_out [C, D]``, ``values [C', D]``."""
    probabilities = jnp.exp(logits - logsumexp[:, None])  # [C, C']
    value_products = dot_transposed_rhs(d_out, values)  # dO_i · v_j  [C, C']
    return probabilities, probabilities * (value_products - delta[:, None])


def identity(dim: int) -> jax.Array:
    """``I`` ``[D, D]`` float32, from iotas (lowers everywhere)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (dim, dim), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (dim, dim), 1)
    return (rows == cols).astype(jnp.float32)


def causal_mask(block: int) -> jax.Array:
    """``i ≥ j`` ``[C, C]`` bool."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    return rows >= cols


def block_rows(index, size: int):
    """Rows ``index·size … index·size + size − 1`` of a ref."""
    return pl.ds(index * size, size)
