"""PaTH preprocessing kernel: the per-block terms of the key side, one program per (batch, KV head, block),
all blocks in parallel (Yang et al. 2025, section 3.2; ``jaxlm.ops.path_blockwise`` gives the same terms in
XLA and is the reference).

For a block of C tokens with Householder directions ``W [C, D]``, strengths ``β [C]`` and keys ``K [C, D]``:

    𝒯 = (I + strictlower(diag(β) W Wᵀ))⁻¹ diag(β)          (UT transform, [C, C], lower triangular)
    K̄ = K − A_kᵀ 𝒯ᵀ W,   A_k[s, j] = w_s·k_j for s > j       (keys carried to the block end, [C, D])
    P = I − Wᵀ 𝒯 W                                           (the block's Householder product, [D, D])

The inverse is assembled from ``S × S`` blocks (``pallas_kernels.triangular``); with ``Y = 𝒯ᵀ W`` (``[C, D]``,
block rows ``Y_s = Σ_{t≥s} 𝒯_tsᵀ W_t``) the other two are ``K̄_j = K_j − Σ_{s≥j} A_k,sjᵀ Y_s`` and
``P = I − Σ_s Y_sᵀ W_s``. The triangular system (Gram blocks and inverse) is full float32 (or TF32×3,
``float32_dots``); the products after it are full float32 for float32 inputs and TF32 for bf16 ones (as in
``kernel_fwd``).

Inputs time-major and padded to whole blocks (``β = 0`` on the padding, so padded tokens are identities):
``k, w [B, T', G, D]``, ``beta [B, T', G]`` float32. Outputs in ``kernel_fwd``'s layout: ``𝒯 [B, G, N·C, C]``
float32, ``K̄ [B, G, T', D]`` in ``carried_dtype``, ``P [B, G, N·D, D]`` float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gdn.float32_dots import float32_precision
from pallas_kernels.path.kernel_fwd import kernel_precision, own_block_terms, raw_product
from pallas_kernels.ssd.common import contract, launch_options
from pallas_kernels.triangular import (blocked_unit_lower_inverse, identity_matrix, store_lower_blocks,
                                       strictly_lower_mask)


def _preprocess_kernel(k_ref, w_ref, beta_ref, transform_ref, carried_ref, products_ref, *, block: int,
                       sub_block: int, precision, system_precision):
    """One block: 𝒯 from its inverse's sub-blocks, then ``Y = 𝒯ᵀ W``, ``K̄`` and ``P`` (module docstring)."""
    count = block // sub_block
    rows = [pl.ds(i * sub_block, sub_block) for i in range(count)]
    raw_directions = [w_ref[r, :] for r in rows]  # W_i  [S, D] each, as given
    raw_keys = [k_ref[r, :] for r in rows]  # K_i  [S, D] each
    directions = [x.astype(jnp.float32) for x in raw_directions]
    betas = [beta_ref[r].astype(jnp.float32) for r in rows]  # β_i  [S] each
    lower = strictly_lower_mask(sub_block)

    def coupling(i, m):
        """``L_im = diag(β_i) W_i W_mᵀ`` (strictly lower on the diagonal)  [S, S]."""
        gram = betas[i][:, None] * raw_product(raw_directions[i], raw_directions[m], 1, 1, system_precision)
        return jnp.where(lower, gram, 0.0) if i == m else gram

    inverse = blocked_unit_lower_inverse(coupling, count, system_precision)
    transform = {(i, j): inverse[i, j] * betas[j][None, :] for (i, j) in inverse}  # 𝒯_ij = X_ij diag(β_j)
    store_lower_blocks(transform_ref, transform, rows)

    def product(a, b, a_axis, b_axis):
        return contract(a, b, a_axis, b_axis, precision)

    carried_rows = [sum(product(transform[t, s], directions[t], 0, 0) for t in range(s, count))
                    for s in range(count)]  # Y_s = Σ_{t≥s} 𝒯_tsᵀ W_t  [S, D]
    for j in range(count):
        moved = raw_keys[j].astype(jnp.float32)  # K̄_j = K_j − Σ_{s≥j} A_k,sjᵀ Y_s  [S, D]
        for s in range(j, count):
            mixing = raw_product(raw_directions[s], raw_keys[j], 1, 1, precision)  # A_k,sj = W_s K_jᵀ  [S, S]
            if s == j:
                mixing = jnp.where(lower, mixing, 0.0)
            moved = moved - product(mixing, carried_rows[s], 0, 0)
        carried_ref[rows[j], :] = moved.astype(carried_ref.dtype)
    dim = products_ref.shape[0]
    householder = identity_matrix(dim) - sum(product(carried_rows[s], directions[s], 0, 0)
                                             for s in range(count))  # P = I − Σ_s Y_sᵀ W_s  [D, D]
    products_ref[...] = householder


def path_preprocess(k: jax.Array, w: jax.Array, beta: jax.Array, *, block: int, sub_block: int = 16,
                    carried_dtype=None, num_warps: int | None = None, interpret=None, float32_dots: str = "ieee"
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(𝒯 [B, G, N·C, C] float32, K̄ [B, G, T', D], P [B, G, N·D, D] float32)`` (module docstring) from
    time-major ``k, w [B, T', G, D]`` and ``beta [B, T', G]`` with ``T'`` whole blocks of ``block`` tokens.

    ``sub_block`` (a power of two ≥ 16 dividing ``block``) is the size of the inverse's blocks;
    ``carried_dtype`` (default: k's dtype) the dtype of ``K̄``; ``float32_dots`` the precision of the triangular
    system's products (``gdn.float32_dots``: ``"ieee"`` full float32, ``"tf32x3"`` TF32×3 tensor-core products on
    GPU)."""
    batch, length, groups, dim = k.shape
    if length % block or block % sub_block or sub_block < 16 or sub_block & (sub_block - 1):
        raise ValueError(f"path_preprocess: length {length} must be whole blocks of {block}, and sub_block "
                         f"{sub_block} a power of two >= 16 dividing the block")
    num_blocks = length // block
    carried_dtype = k.dtype if carried_dtype is None else carried_dtype
    precision = kernel_precision(k.dtype)
    kernel = functools.partial(_preprocess_kernel, block=block, sub_block=sub_block, precision=precision,
                               system_precision=float32_precision(float32_dots, interpret))
    token_block = pl.BlockSpec((None, block, None, dim), lambda b, g, n: (b, n, g, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, groups, num_blocks),
        in_specs=[token_block, token_block, pl.BlockSpec((None, block, None), lambda b, g, n: (b, n, g))],
        out_specs=[
            pl.BlockSpec((None, None, block, block), lambda b, g, n: (b, g, n, 0)),
            pl.BlockSpec((None, None, block, dim), lambda b, g, n: (b, g, n, 0)),
            pl.BlockSpec((None, None, dim, dim), lambda b, g, n: (b, g, n, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, groups, num_blocks * block, block), jnp.float32),
                   jax.ShapeDtypeStruct((batch, groups, length, dim), carried_dtype),
                   jax.ShapeDtypeStruct((batch, groups, num_blocks * dim, dim), jnp.float32)],
        name="path_preprocess",
        **launch_options(interpret, num_warps),
    )(k, w, beta.astype(jnp.float32))


def _query_terms_kernel(q_ref, k_ref, w_ref, transform_ref, queries_ref, intra_ref, *, precision):
    """One query block of one head: ``kernel_fwd.own_block_terms``."""
    intra, queries = own_block_terms(q_ref[...], k_ref[...], w_ref[...], transform_ref[...], precision)
    queries_ref[...] = queries
    intra_ref[...] = intra


def path_query_terms(q: jax.Array, k: jax.Array, w: jax.Array, transform: jax.Array, *, block: int,
                     num_warps: int | None = None, num_stages: int | None = None, interpret=None
                     ) -> tuple[jax.Array, jax.Array]:
    """The query side's per-block terms for the backward, one program per (batch, query head, block):

        Q̄ = Q − A_q 𝒯 W,   S = Q Kᵀ − A_q 𝒯 A_k      (A_q = tril(Q Wᵀ), A_k = strictlower(W Kᵀ))

    from head-major ``q [B, H, T', D]``, raw ``k, w [B, G, T', D]`` and ``transform`` 𝒯 ``[B, G, N·C, C]`` float32
    (head h reads KV head h // (H / G)). Returns ``Q̄ [B, H, T', D]`` and ``S [B, H, N·C, C]``, float32 (products
    as in ``kernel_fwd``)."""
    batch, heads, length, dim = q.shape
    heads_per_group = heads // k.shape[1]
    kernel = functools.partial(_query_terms_kernel, precision=kernel_precision(k.dtype))

    def query_rows(b, h, n):
        return b, h, n, 0

    def kv_rows(b, h, n):
        return b, h // heads_per_group, n, 0

    return pl.pallas_call(
        kernel,
        grid=(batch, heads, length // block),
        in_specs=[pl.BlockSpec((None, None, block, dim), query_rows),
                  pl.BlockSpec((None, None, block, dim), kv_rows),
                  pl.BlockSpec((None, None, block, dim), kv_rows),
                  pl.BlockSpec((None, None, block, block), kv_rows)],
        out_specs=[pl.BlockSpec((None, None, block, dim), query_rows),
                   pl.BlockSpec((None, None, block, block), query_rows)],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, length, dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, length, block), jnp.float32)],
        name="path_query_terms",
        **launch_options(interpret, num_warps, num_stages),
    )(q, k, w, transform)
