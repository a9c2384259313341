"""λ laid out for the log-linear Gated DeltaNet kernels: exactly the level columns the chunking needs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.delta_rule_chunked import pad_time


def level_columns(lam: jax.Array, needed: int) -> jax.Array:
    """``lam [B, T, H, L] -> [B, T, H, needed]`` float32: missing level columns count as 0, extra ones are
    dropped."""
    lam = lam.astype(jnp.float32)
    lam = jnp.pad(lam, ((0, 0), (0, 0), (0, 0), (0, max(needed - lam.shape[-1], 0))))
    return lam[..., :needed]


def level_rows(lam: jax.Array, padding: int, needed: int) -> jax.Array:
    """λ level-major for the kernels: ``[B, T, H, L] -> [B, H, R, T + padding]`` float32 with exactly
    ``needed`` level columns (``level_columns``), rows zero-padded to a power of two ``R`` (Triton block dims)."""
    lam = pad_time(level_columns(lam, needed), padding)  # [B, T', H, needed]
    rows = 1 << (needed - 1).bit_length()
    lam = jnp.pad(lam, ((0, 0), (0, 0), (0, 0), (0, rows - needed)))
    return lam.transpose(0, 2, 3, 1)  # [B, H, R, T']
