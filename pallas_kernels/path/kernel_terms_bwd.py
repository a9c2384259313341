"""PaTH per-block terms, backward: the pullback of ``jaxlm.ops.path_blockwise.blockwise_terms`` (UT transform,
intra-block logits, queries carried to the block start, keys carried to the block end, block products) to the
raw q, k, w and β, with programs per (batch, KV head, block), all blocks in parallel (``kernel_prep`` is the
forward counterpart).

Per block of C tokens of one KV head, with the ``R`` query heads ``Q_r [C, D]`` of its group, ``K, W [C, D]``,
``β [C]`` and the forward's UT transform ``𝒯 [C, C]``, the forward computed

    G = W Wᵀ,  L = strictlower(diag(β) G),  X = (I + L)⁻¹,  𝒯 = X diag(β),
    A_q,r = tril(Q_r Wᵀ),  A_k = strictlower(W Kᵀ),  M_r = A_q,r 𝒯,  Y = 𝒯ᵀ W,
    S_r = Q_r Kᵀ − M_r A_k,   Q̄_r = Q_r − M_r W,   K̄ = K − A_kᵀ Y,   P = I − Wᵀ 𝒯 W.

Given ``dS_r [C, C], dQ̄_r [C, D], dK̄ [C, D], dP [D, D]`` the chain rule, in the order the kernels run it:

1. Per query head r (``M_r`` and the query-side mixing live only inside the loop):

       dM_r   = −dS_r A_kᵀ − dQ̄_r Wᵀ,          dǍ_q,r = tril(dM_r 𝒯ᵀ),
       dQ_r   = dQ̄_r + dS_r K + dǍ_q,r W,
       dK    += dS_rᵀ Q_r,       dW += dǍ_q,rᵀ Q_r − M_rᵀ dQ̄_r,
       d𝒯    += A_q,rᵀ dM_r,     dA_k += −M_rᵀ dS_r.

2. Keys at the block end and the block product (``dY = −A_k dK̄`` from K̄; ``P`` adds ``−W dP Wᵀ`` to ``d𝒯`` and
   ``−𝒯 W dPᵀ − Y dP`` to ``dW``; with ``E = dY − W dPᵀ`` both fold into one term each):

       dA_k  += −Y dK̄ᵀ,          dǍ_k = strictlower(dA_k),
       d𝒯    += W Eᵀ,            dW += 𝒯 E − Y dP + dǍ_k K,
       dK    += dK̄ + dǍ_kᵀ W.

3. Through the inverse. β can be 0 (padding, or given so), so ``X`` is never recovered as ``𝒯 diag(β)⁻¹``: from
   ``X (I + L) = I`` and ``L = diag(β) strictlower(G)``, ``X = I − 𝒯 strictlower(G)``. Then, with ``dX = d𝒯 diag(β)``
   and ``d(I + L) = −Xᵀ dX Xᵀ = −Xᵀ d𝒯 𝒯ᵀ``, restricted to the strictly lower part (the only entries of ``L``):

       Ľ  = −strictlower(Xᵀ d𝒯 𝒯ᵀ),
       dβ_j = Σ_i X_ij d𝒯_ij + Σ_m Ľ_jm G_jm      (from 𝒯 = X diag(β), and from L),
       dG = diag(β) Ľ,   dW += (dG + dGᵀ) W.

Two kernels over the grid ``(B, G, N)``: the mixing kernel runs steps 1 and 2 (per query head, unrolled) and
stores ``d𝒯`` and its share of ``dW``; the inverse kernel runs step 3 and adds the Gram matrix's share. As one
kernel the steps did not fit an H100's shared memory at C = D = 64 with TF32 or full float32 products (245,760
bytes asked, 232,448 there) unless the inverse's products were TF32×3, and then took 54.6 ms at
B, T, H, D = 32, 4096, 32, 64 (G = H, bf16 inputs, 4 warps, one stage) against 25.3 ms for the two (36.7 ms on
8 warps): the extra ``[C, C]`` and ``[C, D]`` float32 round trip per block costs less than the fused kernel's
register pressure.

Precision: products with ``X``, the Gram matrix ``G`` or their cotangents (``X``, ``Ľ`` and ``(dG + dGᵀ) W``) are
TF32×3 (``"tf32x3"``, the default, ``gdn.float32_dots``) or full float32 (``"ieee"``). Products of a raw input
(q, k or w) with another raw input or with a cotangent (``dS_r K``, ``dS_rᵀ Q_r``, ``dQ̄_r Wᵀ``, ``dǍ W``,
``W dPᵀ``, ...) run in the inputs' dtype with float32 accumulation, as FlashAttention's backward multiplies its
bf16 logit cotangents with q and k: bf16 tensor-core products for bf16 inputs (on an H100 the mixing kernel took 19.8 ms
at 32 × 4096 × 32 × 64 with them in TF32). The others (through ``𝒯``, ``M_r``, ``A_k`` or ``Y``) run at
``precision`` (default ``kernel_fwd.kernel_precision`` of q's dtype: full float32 for float32 inputs, TF32 for
bf16 ones).

Layouts (head-major, ``T'`` whole blocks, as ``kernel_fwd.path_forward``): ``q [B, H, T', D]`` and
``k, w [B, G, T', D]`` in the input dtype, ``beta [B, G, T']``, ``transform [B, G, N·C, C]``, ``d_queries
[B, H, T', D]``, ``d_intra [B, H, N·C, C]``, ``d_keys [B, G, T', D]`` (summed over the group's query heads),
``d_products [B, G, N·D, D]``, all float32. Query head h belongs to KV head ``h // R``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gdn.float32_dots import float32_precision
from pallas_kernels.path.kernel_fwd import kernel_precision, raw_product
from pallas_kernels.ssd.common import contract, launch_options
from pallas_kernels.triangular import identity_matrix, strictly_lower_mask


def _lower_mask(size: int) -> jax.Array:
    """``rows >= cols`` as a ``[size, size]`` bool mask (diagonal included)."""
    return (jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
            >= jax.lax.broadcasted_iota(jnp.int32, (size, size), 1))


def _input_dtype_product(a, b, a_axis, b_axis, *, dtype, precision):
    """``contract`` of a raw input with a cotangent (or another raw input), both cast to the inputs' ``dtype``,
    float32 accumulation (module docstring, "Precision")."""
    return contract(a.astype(dtype), b.astype(dtype), a_axis, b_axis, precision)


def _query_head_pullback(r, carry, *, q_ref, d_queries_ref, d_intra_ref, dq_ref, keys, directions, transform,
                         key_mixing, precision, raw_dtype):
    """Step 1 of the module docstring for query head r: stores ``dQ_r`` and adds the head's share to
    ``(dK [C, D], dW [C, D], d𝒯 [C, C], dA_k [C, C])``. ``keys`` and ``directions`` are in ``raw_dtype``."""
    d_keys, d_directions, d_transform, d_key_mixing = carry
    block = keys.shape[0]
    queries = q_ref[r].astype(raw_dtype)  # Q_r  [C, D]
    d_intra = d_intra_ref[r]  # dS_r  [C, C]
    d_carried = d_queries_ref[r]  # dQ̄_r  [C, D]

    def product(a, b, a_axis, b_axis):
        return contract(a, b, a_axis, b_axis, precision)

    narrow = functools.partial(_input_dtype_product, dtype=raw_dtype, precision=precision)

    lower = _lower_mask(block)
    query_mixing = jnp.where(lower, narrow(queries, directions, 1, 1), 0.0)  # A_q,r  [C, C]
    mixed = product(query_mixing, transform, 1, 0)  # M_r = A_q,r 𝒯  [C, C]
    d_mixed = -product(d_intra, key_mixing, 1, 1) - narrow(d_carried, directions, 1, 1)  # dM_r  [C, C]
    d_query_mixing = jnp.where(lower, product(d_mixed, transform, 1, 1), 0.0)  # dǍ_q,r  [C, C]
    dq_ref[r] = d_carried + narrow(d_intra, keys, 1, 0) + narrow(d_query_mixing, directions, 1, 0)
    d_keys = d_keys + narrow(d_intra, queries, 0, 0)
    d_directions = d_directions + narrow(d_query_mixing, queries, 0, 0) - product(mixed, d_carried, 0, 0)
    d_transform = d_transform + product(query_mixing, d_mixed, 0, 0)
    d_key_mixing = d_key_mixing - product(mixed, d_intra, 0, 0)
    return d_keys, d_directions, d_transform, d_key_mixing


def _carried_keys_and_product_pullback(carry, *, d_carried_keys, d_products, keys, directions, transform,
                                       key_mixing, precision, raw_dtype):
    """Step 2 of the module docstring: ``(dK, dW, d𝒯)`` after the keys at the block end and the block product."""
    d_keys, d_directions, d_transform, d_key_mixing = carry

    def product(a, b, a_axis, b_axis):
        return contract(a, b, a_axis, b_axis, precision)

    narrow = functools.partial(_input_dtype_product, dtype=raw_dtype, precision=precision)

    carried_rows = product(transform, directions.astype(jnp.float32), 0, 0)  # Y = 𝒯ᵀ W  [C, D]
    d_carried_rows = -product(key_mixing, d_carried_keys, 1, 0)  # dY = −A_k dK̄  [C, D]
    d_key_mixing = d_key_mixing - product(carried_rows, d_carried_keys, 1, 1)  # [C, C]
    d_key_mixing = jnp.where(strictly_lower_mask(keys.shape[0]), d_key_mixing, 0.0)  # dǍ_k
    folded = d_carried_rows - narrow(directions, d_products, 1, 1)  # E = dY − W dPᵀ  [C, D]
    d_transform = d_transform + narrow(directions, folded, 1, 1)
    d_directions = (d_directions + product(transform, folded, 1, 0) - product(carried_rows, d_products, 1, 0)
                    + narrow(d_key_mixing, keys, 1, 0))
    d_keys = d_keys + d_carried_keys + narrow(d_key_mixing, directions, 0, 0)
    return d_keys, d_directions, d_transform


def _inverse_pullback(d_transform, *, directions, betas, transform, system_precision):
    """Step 3 of the module docstring: ``(dβ [C], the Gram matrix's share of dW [C, D])`` from ``d𝒯``."""
    block = directions.shape[0]
    strict = strictly_lower_mask(block)

    def product(a, b, a_axis, b_axis):
        return contract(a, b, a_axis, b_axis, system_precision)

    gram = raw_product(directions, directions, 1, 1, system_precision)  # G = W Wᵀ  [C, C]
    lower_gram = jnp.where(strict, gram, 0.0)  # strictlower(G)
    inverse = identity_matrix(block) - product(transform, lower_gram, 1, 0)  # X = I − 𝒯 strictlower(G)  [C, C]
    d_system = product(inverse, product(d_transform, transform, 1, 1), 0, 0)  # Xᵀ d𝒯 𝒯ᵀ  [C, C]
    d_coupling = jnp.where(strict, -d_system, 0.0)  # Ľ  [C, C]
    d_betas = jnp.sum(inverse * d_transform, axis=0) + jnp.sum(d_coupling * gram, axis=1)  # [C]
    d_gram = betas[:, None] * d_coupling  # dG = diag(β) Ľ  [C, C]
    directions = directions.astype(jnp.float32)
    return d_betas, product(d_gram, directions, 1, 0) + product(d_gram, directions, 0, 0)  # (dG + dGᵀ) W


def _mixing_kernel(q_ref, k_ref, w_ref, transform_ref, d_queries_ref, d_intra_ref, d_keys_ref, d_products_ref,
                   dq_ref, dk_ref, dw_ref, d_transform_ref, *, heads_per_group: int, precision):
    """Steps 1 and 2 of the module docstring for one (batch, KV head, block): stores ``dQ_r``, ``dK``, the share
    of ``dW`` that does not go through the inverse, and ``d𝒯``."""
    raw_dtype = jnp.result_type(q_ref.dtype, k_ref.dtype, w_ref.dtype)
    keys = k_ref[...].astype(raw_dtype)  # K  [C, D]
    directions = w_ref[...].astype(raw_dtype)  # W  [C, D]
    transform = transform_ref[...]  # 𝒯  [C, C]
    block, dim = keys.shape
    key_mixing = jnp.where(strictly_lower_mask(block), raw_product(directions, keys, 1, 1, precision), 0.0)  # A_k
    shared = dict(keys=keys, directions=directions, transform=transform, key_mixing=key_mixing,
                  precision=precision, raw_dtype=raw_dtype)
    carry = (jnp.zeros((block, dim), jnp.float32), jnp.zeros((block, dim), jnp.float32),
             jnp.zeros((block, block), jnp.float32), jnp.zeros((block, block), jnp.float32))
    for head in range(heads_per_group):  # unrolled: a fori_loop here overflows an H100's shared memory
        carry = _query_head_pullback(head, carry, q_ref=q_ref, d_queries_ref=d_queries_ref, d_intra_ref=d_intra_ref,
                                     dq_ref=dq_ref, **shared)
    d_keys, d_directions, d_transform = _carried_keys_and_product_pullback(
        carry, d_carried_keys=d_keys_ref[...], d_products=d_products_ref[...], **shared)
    dk_ref[...] = d_keys
    dw_ref[...] = d_directions
    d_transform_ref[...] = d_transform


def _inverse_kernel(w_ref, beta_ref, transform_ref, d_transform_ref, d_mixing_ref, dw_ref, dbeta_ref, *,
                    system_precision):
    """Step 3 of the module docstring for one (batch, KV head, block): ``dβ``, and ``dW`` = the mixing kernel's
    share plus the Gram matrix's."""
    d_betas, d_gram_share = _inverse_pullback(d_transform_ref[...], directions=w_ref[...],
                                              betas=beta_ref[...], transform=transform_ref[...],
                                              system_precision=system_precision)
    dw_ref[...] = d_mixing_ref[...] + d_gram_share
    dbeta_ref[...] = d_betas


def _check_shapes(q, k, w, beta, transform, d_queries, d_intra, d_keys, d_products, block: int) -> None:
    """ValueError naming the first operand whose shape does not fit the layouts of the module docstring."""
    batch, heads, length, dim = q.shape
    groups = k.shape[1]
    if block < 16 or block & (block - 1) or length % block:
        raise ValueError(f"path_terms_backward: block={block} must be a power of two >= 16 and the padded length "
                         f"{length} whole blocks of it")
    if groups < 1 or heads % groups:
        raise ValueError(f"path_terms_backward: query heads {heads} must be a multiple of the KV heads {groups}")
    num_blocks = length // block
    expected = dict(k=(batch, groups, length, dim), w=(batch, groups, length, dim), beta=(batch, groups, length),
                    transform=(batch, groups, num_blocks * block, block), d_queries=q.shape,
                    d_intra=(batch, heads, num_blocks * block, block), d_keys=(batch, groups, length, dim),
                    d_products=(batch, groups, num_blocks * dim, dim))
    given = dict(k=k, w=w, beta=beta, transform=transform, d_queries=d_queries, d_intra=d_intra, d_keys=d_keys,
                 d_products=d_products)
    for name, shape in expected.items():
        if given[name].shape != shape:
            raise ValueError(f"path_terms_backward: {name} has shape {given[name].shape}, expected {shape} "
                             f"(q {q.shape}, block {block})")


def path_terms_backward(q, k, w, beta, transform, d_queries, d_intra, d_keys, d_products, *, block: int,
                        interpret=None, num_warps: int | None = None, num_stages: int | None = None,
                        precision=None, float32_dots: str = "tf32x3"):
    """``(dq [B, H, T', D], dk [B, G, T', D], dw [B, G, T', D], dbeta [B, G, T'])`` float32: the pullback of the
    per-block terms (module docstring) to the raw inputs, the same as ``jax.vjp`` of
    ``jaxlm.ops.path_blockwise.blockwise_terms`` gives for q, k, w and β.

    ``precision``: of the products not through the inverse (None: ``kernel_fwd.kernel_precision`` of q's dtype);
    ``float32_dots``: of those through it (``"tf32x3"`` or ``"ieee"``, ``gdn.float32_dots``; interpret mode always
    takes full float32). ``interpret`` None
    runs interpret mode on CPU only; ``num_warps`` / ``num_stages``: Triton settings on GPU (None: Pallas'
    defaults). ValueError for shapes outside the module docstring's layouts.
    """
    _check_shapes(q, k, w, beta, transform, d_queries, d_intra, d_keys, d_products, block)
    batch, heads, length, dim = q.shape
    groups = k.shape[1]
    heads_per_group = heads // groups
    num_blocks = length // block
    precision = kernel_precision(q.dtype) if precision is None else precision
    group_rows = pl.BlockSpec((None, heads_per_group, block, dim), lambda b, g, n: (b, g, n, 0))
    group_square = pl.BlockSpec((None, heads_per_group, block, block), lambda b, g, n: (b, g, n, 0))
    kv_rows = pl.BlockSpec((None, None, block, dim), lambda b, g, n: (b, g, n, 0))
    kv_square = pl.BlockSpec((None, None, block, block), lambda b, g, n: (b, g, n, 0))
    kv_tokens = pl.BlockSpec((None, None, block), lambda b, g, n: (b, g, n))
    kv_product = pl.BlockSpec((None, None, dim, dim), lambda b, g, n: (b, g, n, 0))
    float32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    options = launch_options(interpret, num_warps, num_stages)
    dq, dk, d_mixing, d_transform = pl.pallas_call(
        functools.partial(_mixing_kernel, heads_per_group=heads_per_group, precision=precision),
        grid=(batch, groups, num_blocks),
        in_specs=[group_rows, kv_rows, kv_rows, kv_square, group_rows, group_square, kv_rows, kv_product],
        out_specs=[group_rows, kv_rows, kv_rows, kv_square],
        out_shape=[float32(q.shape), float32(k.shape), float32(w.shape), float32(transform.shape)],
        name="path_terms_backward_mixing",
        **options,
    )(q, k, w, transform, d_queries, d_intra, d_keys, d_products)
    dw, dbeta = pl.pallas_call(
        functools.partial(_inverse_kernel, system_precision=float32_precision(float32_dots, interpret)),
        grid=(batch, groups, num_blocks),
        in_specs=[kv_rows, kv_tokens, kv_square, kv_square, kv_rows],
        out_specs=[kv_rows, kv_tokens],
        out_shape=[float32(w.shape), float32(beta.shape)],
        name="path_terms_backward_inverse",
        **options,
    )(w, beta.astype(jnp.float32), transform, d_transform, d_mixing)
    return dq, dk, dw, dbeta
