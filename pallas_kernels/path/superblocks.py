"""Products of the PaTH block products over super-blocks of S consecutive key blocks, shared by the forward
kernel and both backward kernels: queries meet the key blocks of an earlier super-block through the keys
carried to that super-block's end, and cross it in one move.

Super-block τ holds blocks ``τS … τS + S − 1``. Its block j has the suffix ``R_j = P_{τS+S−1} … P_{j+1}``
(the products of the later blocks of its super-block, ``R_j = I`` for the last block), and the super-block the
product ``Φ_τ = P_{τS+S−1} … P_{τS}``. A query row vector at the end of super-block τ meets key ``k̄`` of block j
(carried to j's block end) through ``R_j``, so with the key carried to the super-block end

    K̂_j = K̄_j R_jᵀ        (rows: k̂ = R_j k̄)

its logit is one dot product, ``x · k̂``, and the query crosses the whole super-block in one move ``x ← x Φ_τ``.

``keys_to_superblock_end`` computes K̂ and Φ in XLA (full float32 products; the reference, differentiated by
``jax.vjp``), ``superblock_keys_kernel`` in a Pallas kernel, one program per (batch, KV head, super-block)
walking its blocks right to left with ``R`` in float32 (products at ``kernel_fwd.kernel_precision``: TF32 for
bf16 keys), and ``superblock_keys_pullback`` its pullback, walking the blocks left to right with the stored
suffixes. On GPU both take the PaTH kernels' one pipeline stage (``blocks``): at D = 128 the default stages
asked an H100 for 352 KiB of shared memory (it has 227 KiB).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.path.kernel_bwd_common import contract, dot, identity
from pallas_kernels.path.kernel_fwd import kernel_precision
from pallas_kernels.ssd.common import launch_options


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


def _superblock_keys_kernel(keys_ref, products_ref, carried_ref, whole_ref, *suffixes_ref, block: int, dim: int,
                            num_blocks: int, superblock: int, precision):
    """Super-block τ: ``K̂_j = K̄_j R_jᵀ`` for its blocks right to left with ``R ← R P_j``, then ``Φ_τ = R``;
    with a ``suffixes_ref``, also every ``R_j``. Rows past the last block (a partial last super-block) are zeros."""
    first = pl.program_id(2) * superblock
    count = jnp.minimum(superblock, num_blocks - first)  # blocks in this super-block

    def clear(local, later):
        """Zeros for a block past the last one (``later``, the identity, passes through)."""
        carried_ref[pl.ds(local * block, block), :] = jnp.zeros((block, dim), carried_ref.dtype)
        for ref in suffixes_ref:
            ref[pl.ds(local * dim, dim), :] = jnp.zeros((dim, dim), jnp.float32)
        return later

    def visit(step, later):
        """Block ``first + count − 1 − step`` with ``later = R_j``  [D, D]."""
        local = count - 1 - step
        keys = keys_ref[pl.ds((first + local) * block, block), :].astype(jnp.float32)  # K̄_j  [C, D]
        carried_ref[pl.ds(local * block, block), :] = contract(keys, later, 1, 1, precision).astype(carried_ref.dtype)
        for ref in suffixes_ref:
            ref[pl.ds(local * dim, dim), :] = later
        return dot(later, products_ref[pl.ds((first + local) * dim, dim), :], precision)  # R_{j−1} = R_j P_j

    start = jax.lax.fori_loop(count, superblock, clear, identity(dim))  # R = I
    whole_ref[...] = jax.lax.fori_loop(0, count, visit, start)


def _whole_head(b, g, s):
    return b, g, 0, 0


def _superblock_rows(b, g, s):
    return b, g, s, 0


def _superblock_launch(kernel_body, keys: jax.Array, products: jax.Array, superblock: int):
    """``(kernel, grid, block, num_blocks)``: ``kernel_body`` with its static sizes bound (block C, head dim,
    block count N, S and the products' precision) and the grid of one program per (batch, KV head, super-block),
    for keys ``[B, G, N·C, D]`` and block products ``[B, G, N·D, D]``."""
    batch, groups, length, dim = keys.shape
    num_blocks = products.shape[2] // dim
    block = length // num_blocks
    kernel = functools.partial(kernel_body, block=block, dim=dim, num_blocks=num_blocks, superblock=superblock,
                               precision=kernel_precision(keys.dtype))
    return kernel, (batch, groups, -(-num_blocks // superblock)), block, num_blocks


def superblock_keys_kernel(keys: jax.Array, products: jax.Array, superblock: int, *, with_suffixes: bool = False,
                           interpret=None, num_warps: int | None = None,
                           num_stages: int | None = None) -> tuple[jax.Array, ...]:
    """``keys_to_superblock_end`` on a Pallas kernel: ``(K̂ [B, G, N'·C, D]`` in the keys' dtype (N' = N rounded
    up to whole super-blocks, zeros past the last block), ``Φ [B, G, ceil(N / S)·D, D]`` float32)``, and with
    ``with_suffixes`` the suffixes ``R_j [B, G, N'·D, D]`` float32 (zeros past the last block) for
    ``superblock_keys_pullback``."""
    batch, groups, length, dim = keys.shape
    kernel, grid, block, num_blocks = _superblock_launch(_superblock_keys_kernel, keys, products, superblock)
    num_superblocks = grid[2]
    out_specs = [pl.BlockSpec((None, None, superblock * block, dim), _superblock_rows),
                 pl.BlockSpec((None, None, dim, dim), _superblock_rows)]
    out_shape = [jax.ShapeDtypeStruct((batch, groups, num_superblocks * superblock * block, dim), keys.dtype),
                 jax.ShapeDtypeStruct((batch, groups, num_superblocks * dim, dim), jnp.float32)]
    if with_suffixes:
        out_specs.append(pl.BlockSpec((None, None, superblock * dim, dim), _superblock_rows))
        out_shape.append(jax.ShapeDtypeStruct((batch, groups, num_superblocks * superblock * dim, dim), jnp.float32))
    return tuple(pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((None, None, length, dim), _whole_head),
                  pl.BlockSpec((None, None, num_blocks * dim, dim), _whole_head)],
        out_specs=out_specs,
        out_shape=out_shape,
        **launch_options(interpret, num_warps, num_stages),
        name="path_superblock_keys",
    )(keys, products))


def _superblock_pullback_kernel(keys_ref, products_ref, suffixes_ref, d_carried_ref, d_whole_ref, d_keys_ref,
                                d_products_ref, *, block: int, dim: int, num_blocks: int, superblock: int, precision):
    """Super-block τ, blocks left to right with ``G`` the cotangent of ``R_{j−1}`` (``G = dΦ_τ`` first):

        dP_j = R_jᵀ G,   dK̄_j = dK̂_j R_j,   G ← G P_jᵀ + dK̂_jᵀ K̄_j

    (the reverse of ``R_{j−1} = R_j P_j`` and ``K̂_j = K̄_j R_jᵀ``); rows past the last block are zeros."""
    first = pl.program_id(2) * superblock
    count = jnp.minimum(superblock, num_blocks - first)

    def clear(local, cotangent):
        d_keys_ref[pl.ds(local * block, block), :] = jnp.zeros((block, dim), jnp.float32)
        d_products_ref[pl.ds(local * dim, dim), :] = jnp.zeros((dim, dim), jnp.float32)
        return cotangent

    def visit(local, cotangent):
        """Block ``first + local`` with ``cotangent = G``  [D, D]."""
        suffix = suffixes_ref[pl.ds(local * dim, dim), :]  # R_j  [D, D]
        keys = keys_ref[pl.ds((first + local) * block, block), :].astype(jnp.float32)  # K̄_j  [C, D]
        d_carried = d_carried_ref[pl.ds((first + local) * block, block), :]  # dK̂_j  [C, D]
        d_products_ref[pl.ds(local * dim, dim), :] = contract(suffix, cotangent, 0, 0, precision)
        d_keys_ref[pl.ds(local * block, block), :] = dot(d_carried, suffix, precision)
        product = products_ref[pl.ds((first + local) * dim, dim), :]  # P_j  [D, D]
        return contract(cotangent, product, 1, 1, precision) + contract(d_carried, keys, 0, 0, precision)

    jax.lax.fori_loop(0, count, visit, jax.lax.fori_loop(count, superblock, clear, d_whole_ref[...]))


def superblock_keys_pullback(keys: jax.Array, products: jax.Array, suffixes: jax.Array, d_superkeys: jax.Array,
                             d_superproducts: jax.Array, superblock: int, *, interpret=None,
                             num_warps: int | None = None, num_stages: int | None = None
                             ) -> tuple[jax.Array, jax.Array]:
    """The pullback of ``keys_to_superblock_end`` on a Pallas kernel: ``(dK̄ [B, G, T', D], dP [B, G, N·D, D])``
    float32 from ``keys [B, G, T', D]``, ``products [B, G, N·D, D]``, the suffixes of
    ``superblock_keys_kernel(..., with_suffixes=True)`` and the cotangents ``dK̂ [B, G, T', D]`` and ``dΦ``."""
    batch, groups, length, dim = keys.shape
    kernel, grid, block, num_blocks = _superblock_launch(_superblock_pullback_kernel, keys, products, superblock)
    num_superblocks = grid[2]
    d_keys, d_products = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((None, None, length, dim), _whole_head),
                  pl.BlockSpec((None, None, num_blocks * dim, dim), _whole_head),
                  pl.BlockSpec((None, None, superblock * dim, dim), _superblock_rows),
                  pl.BlockSpec((None, None, length, dim), _whole_head),
                  pl.BlockSpec((None, None, dim, dim), _superblock_rows)],
        out_specs=[pl.BlockSpec((None, None, superblock * block, dim), _superblock_rows),
                   pl.BlockSpec((None, None, superblock * dim, dim), _superblock_rows)],
        out_shape=[jax.ShapeDtypeStruct((batch, groups, num_superblocks * superblock * block, dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, groups, num_superblocks * superblock * dim, dim), jnp.float32)],
        **launch_options(interpret, num_warps, num_stages),
        name="path_superblock_keys_pullback",
    )(keys, products, suffixes, d_superkeys, d_superproducts)
    return d_keys[:, :, :length], d_products[:, :, :num_blocks * dim]
