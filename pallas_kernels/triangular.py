"""Inverse of a unit lower-triangular matrix inside a kernel, shared by the UT transforms of the delta-rule
family (Gated DeltaNet chunks, PaTH blocks).

A ``C × C`` matrix ``I + L`` with ``L`` strictly lower is inverted from ``S × S`` blocks (``C = n·S``): each
diagonal block by repeated squaring (``unit_lower_inverse``), the blocks below the diagonal by

    X_ij = −X_ii Σ_{m=j}^{i−1} L_im X_mj        (j < i),

all in float32 with full float32 products (no TF32): about ``C³/3`` multiply-adds in ``S``-sized products
instead of the ``2 log2(C)`` full ``C × C`` products of squaring the whole matrix. Triton needs every
product dimension to be at least 16, so ``S ≥ 16``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.common import dot

HIGHEST = jax.lax.Precision.HIGHEST


def identity_matrix(size: int) -> jax.Array:
    """``I [size, size]`` float32, built from iotas (kernels cannot close over array constants)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return jnp.where(rows == cols, 1.0, 0.0)


def strictly_lower_mask(size: int) -> jax.Array:
    """``rows > cols`` as a ``[size, size]`` bool mask."""
    return (jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
            > jax.lax.broadcasted_iota(jnp.int32, (size, size), 1))


def unit_lower_inverse(strict_lower: jax.Array, precision=HIGHEST) -> jax.Array:
    """``(I + A)⁻¹`` of a strictly lower ``A [S, S]`` float32 (S a power of two) by repeated squaring:
    ``A`` is nilpotent (``A^S = 0``), so ``(I + A)⁻¹ = Σ_{i<S} (−A)^i = (I − A)(I + A²)(I + A⁴)…(I + A^{S/2})``,
    ``2 log2(S) − 2`` float32 ``S × S`` products at ``precision`` and no sequential row loop."""
    identity = identity_matrix(strict_lower.shape[0])  # [S, S]
    power = -strict_lower  # (−A)^(2^m)
    inverse = identity + power
    for _ in range(strict_lower.shape[0].bit_length() - 2):
        power = dot(power, power, precision)
        inverse = dot(inverse, identity + power, precision)
    return inverse


def blocked_unit_lower_inverse(coupling: Callable[[int, int], jax.Array], count: int,
                               precision=HIGHEST) -> dict[tuple[int, int], jax.Array]:
    """Blocks ``X_ij`` (``i ≥ j``) of ``X = (I + L)⁻¹`` (module docstring) as a dict ``(i, j) -> [S, S]``.

    ``coupling(i, m)`` returns block ``L_im [S, S]`` float32 for ``i ≥ m`` (strictly lower when ``i == m``);
    blocks above the diagonal are zero and not returned. ``precision``: of the float32 products (default
    full float32; ``DotAlgorithmPreset.TF32_TF32_F32_X3`` is close to it on GPU tensor cores)."""
    inverse = {}
    for i in range(count):
        inverse[i, i] = unit_lower_inverse(coupling(i, i), precision)
        below = [coupling(i, m) for m in range(i)]  # L_im  [S, S] each
        for j in range(i):
            summed = sum(dot(below[m], inverse[m, j], precision) for m in range(j, i))  # Σ_m L_im X_mj  [S, S]
            inverse[i, j] = -dot(inverse[i, i], summed, precision)
    return inverse


def store_lower_blocks(ref, blocks: dict[tuple[int, int], jax.Array], rows: list) -> None:
    """Write a block lower-triangular matrix into a ``[C, C]`` ref: ``blocks[i, j]`` (``j ≤ i``) at
    ``(rows[i], rows[j])``, zeros above the diagonal blocks (``rows``: ``pl.ds`` slices of S rows)."""
    for i, row_slice in enumerate(rows):
        for j, col_slice in enumerate(rows):
            value = blocks[i, j] if j <= i else jnp.zeros((row_slice.size, col_slice.size), jnp.float32)
            ref[row_slice, col_slice] = value
