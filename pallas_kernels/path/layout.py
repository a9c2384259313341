"""Layouts of the PaTH kernels: head-major ``[B, X, T', D]`` operands with T padded to whole blocks, and the
forward's per-KV-head block terms (UT transform 𝒯, keys carried to the block end K̄, block products P) in the
kernels' layout, from XLA (``jaxlm.ops.path_blockwise``) or the preprocessing kernel (``kernel_prep``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.path_blockwise import block_products, keys_to_block_end, to_blocks, ut_transform
from pallas_kernels.path.blocks import PathBlocks
from pallas_kernels.path.kernel_prep import path_preprocess
from pallas_kernels.path.superblocks import keys_to_superblock_end, superblock_keys_kernel


def head_major(x: jax.Array, block: int) -> jax.Array:
    """``[B, T, X, D]`` -> ``[B, X, T', D]``, T padded with zeros to whole blocks (``β = 0`` there: H = I)."""
    return jnp.moveaxis(to_blocks(x, block), 3, 1).reshape(x.shape[0], x.shape[2], -1, x.shape[3])


def head_major_tokens(x: jax.Array, block: int) -> jax.Array:
    """``[B, T, X]`` -> ``[B, X, T']`` float32 (one value per token and head), zero-padded like ``head_major``."""
    return head_major(x.astype(jnp.float32)[..., None], block)[..., 0]


def time_major(x: jax.Array, length: int, dtype) -> jax.Array:
    """``head_major``'s inverse: ``[B, X, T', ...]`` -> ``[B, T, X, ...]`` in ``dtype``, the padding dropped."""
    return jnp.swapaxes(x, 1, 2)[:, :length].astype(dtype)


def cumulative_gate(log_f: jax.Array | None, block: int) -> jax.Array | None:
    """``G_t = Σ_{t' ≤ t} log f_t'`` head-major ``[B, H, T']`` float32 from ``log_f [B, T, H]`` (None: no gate)."""
    if log_f is None:
        return None
    return head_major_tokens(jnp.cumsum(log_f.astype(jnp.float32), axis=1), block)


def kernel_layout(q, k, v, w, beta, blocks: PathBlocks, block_terms=None) -> list[jax.Array]:
    """The kernel's inputs (``kernel_fwd`` module docstring) but the gate and segments: ``q [B, H, T', D]``
    and raw ``k, w [B, G, T', D]`` as given; carried keys ``k̄`` and values ``[B, G, T', D]`` in the inputs'
    dtype; per block 𝒯 ``[B, G, N·C, C]`` and products ``[B, G, N·D, D]`` float32. ``block_terms`` ``(𝒯, k̄, P)``
    when already built (the forward's, saved for the backward); otherwise they come from the preprocessing kernel
    (``blocks.preprocess == "kernel"``, with ``blocks.prep_sub_block`` and ``blocks.float32_dots``) or
    ``jaxlm.ops.path_blockwise`` (``"xla"``)."""
    block = blocks.block
    kv_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if block_terms is not None:
        transform, carried, products = block_terms
    elif blocks.preprocess == "kernel":
        transform, carried, products = path_preprocess(*(padded_time_major(x, block) for x in (k, w, beta)),
                                                       block=block, sub_block=blocks.prep_sub_block,
                                                       carried_dtype=kv_dtype, float32_dots=blocks.float32_dots,
                                                       num_warps=blocks.num_warps)
    else:
        transform, carried, products = xla_block_terms(k, w, beta, block, kv_dtype)
    return [head_major(q, block), head_major(k, block), head_major(w, block), transform, carried,
            head_major(v.astype(kv_dtype), block), products]


def forward_layout(q, k, v, w, beta, blocks: PathBlocks, superblock: int) -> list[jax.Array]:
    """The forward kernel's inputs but the gate and segments: ``kernel_layout``'s, then the keys carried to
    their super-block end ``k̂ [B, G, T'', D]`` and the super-block products ``Φ`` float32, over super-blocks of
    ``superblock`` key blocks, on the kernel (``blocks.preprocess == "kernel"``) or in XLA (``superblocks`` module
    docstring)."""
    inputs = kernel_layout(q, k, v, w, beta, blocks)
    carried, products = inputs[4], inputs[6]
    if blocks.preprocess == "kernel":
        superblock_terms = superblock_keys_kernel(carried, products, superblock, num_warps=blocks.num_warps,
                                                  num_stages=blocks.num_stages)
    else:
        superblock_terms = keys_to_superblock_end(carried, products, superblock)
    return inputs + list(superblock_terms)


def padded_time_major(x: jax.Array, block: int) -> jax.Array:
    """``[B, T, ...]`` -> ``[B, T', ...]``, zero-padded to whole blocks (``β = 0`` there: H = I)."""
    return to_blocks(x, block).reshape(x.shape[0], -1, *x.shape[2:])


def xla_block_terms(k, w, beta, block: int, kv_dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``kernel_prep.path_preprocess``'s outputs (𝒯 ``[B, G, N·C, C]``, K̄ ``[B, G, T', D]``, P ``[B, G, N·D, D]``)
    from the XLA block terms of ``jaxlm.ops.path_blockwise``."""
    batch, _, num_groups, dim = k.shape
    kb, wb = (to_blocks(x.astype(jnp.float32), block) for x in (k, w))  # [B, N, C, G, D]
    transform = ut_transform(wb, to_blocks(beta.astype(jnp.float32), block))  # 𝒯  [B, N, G, C, C]
    keys_at_end = keys_to_block_end(kb, wb, transform)  # K̄  [B, N, C, G, D]
    products = block_products(wb, transform)  # P  [B, N, G, D, D]
    num_blocks = kb.shape[1]
    carried = jnp.moveaxis(keys_at_end, 3, 1).reshape(batch, num_groups, num_blocks * block, dim)
    return (jnp.moveaxis(transform, 2, 1).reshape(batch, num_groups, num_blocks * block, block),
            carried.astype(kv_dtype),
            jnp.moveaxis(products, 2, 1).reshape(batch, num_groups, num_blocks * dim, dim))
