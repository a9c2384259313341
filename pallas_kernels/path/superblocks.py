"""Products of the PaTH block products over super-blocks of S consecutive key blocks, shared by the forward
kernel (keys carried to their super-block's end) and the query-side backward (moved queries rebuilt from
super-block products).

Super-block τ holds blocks ``τS … τS + S − 1``. Its block j has the suffix ``R_j = P_{τS+S−1} … P_{j+1}``
(the products of the later blocks of its super-block, ``R_j = I`` for the last block), and the super-block the
product ``Φ_τ = P_{τS+S−1} … P_{τS}``. A query row vector at the end of super-block τ meets key ``k̄`` of block j
(carried to j's block end) through ``R_j``, so with the key carried to the super-block end

    K̂_j = K̄_j R_jᵀ        (rows: k̂ = R_j k̄)

its logit is one dot product, ``x · k̂``, and the query crosses the whole super-block in one move ``x ← x Φ_τ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def superblock_suffixes(products: jax.Array, superblock: int) -> tuple[jax.Array, jax.Array]:
    """Per-block suffixes ``R_j`` ``[B, G, N'·D, D]`` and super-block products ``Φ_τ`` ``[B, G, (N' / S)·D, D]``
    (module docstring), float32, from the block products ``[B, G, N·D, D]``; N' = N rounded up to whole
    super-blocks (identities past the last block)."""
    batch, groups, rows, dim = products.shape
    num_blocks = rows // dim
    num_superblocks = -(-num_blocks // superblock)
    padding = jnp.broadcast_to(jnp.eye(dim, dtype=products.dtype),
                               (batch, groups, num_superblocks * superblock - num_blocks, dim, dim))
    blocks = jnp.concatenate([products.reshape(batch, groups, num_blocks, dim, dim), padding], axis=2)
    by_superblock = blocks.reshape(batch, groups, num_superblocks, superblock, dim, dim)

    def prepend(later, product):
        """``R_j`` is the product of the blocks after j; then ``R_{j−1} = R_j P_j``."""
        return jnp.matmul(later, product, precision=jax.lax.Precision.HIGHEST), later

    identity = jnp.broadcast_to(jnp.eye(dim, dtype=products.dtype), by_superblock.shape[:3] + (dim, dim))
    whole, suffixes = jax.lax.scan(prepend, identity, jnp.moveaxis(by_superblock, 3, 0), reverse=True)
    suffixes = jnp.moveaxis(suffixes, 0, 3)  # [B, G, N'/S, S, D, D]
    return suffixes.reshape(batch, groups, -1, dim), whole.reshape(batch, groups, -1, dim)


def keys_to_superblock_end(keys: jax.Array, products: jax.Array, superblock: int) -> tuple[jax.Array, jax.Array]:
    """``(K̂ [B, G, T', D]`` in the keys' dtype, ``Φ [B, G, ceil(N / S)·D, D]`` float32): the keys carried to their
    block end ``K̄ [B, G, T', D]`` (``T' = N·C``) carried on to their super-block's end, ``K̂_j = K̄_j R_jᵀ``, and
    the super-block products, from the block products ``[B, G, N·D, D]``."""
    batch, groups, length, dim = keys.shape
    num_blocks = products.shape[2] // dim
    block = length // num_blocks
    suffixes, whole = superblock_suffixes(products, superblock)
    suffixes = suffixes.reshape(batch, groups, -1, dim, dim)[:, :, :num_blocks]  # R_j  [B, G, N, D, D]
    by_block = keys.reshape(batch, groups, num_blocks, block, dim).astype(jnp.float32)
    carried = jnp.einsum("bgncd,bgned->bgnce", by_block, suffixes, precision=jax.lax.Precision.HIGHEST)
    return carried.reshape(keys.shape).astype(keys.dtype), whole
