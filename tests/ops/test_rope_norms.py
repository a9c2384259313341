"""RoPE and RMSNorm against float64 numpy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops import apply_rope, rms_norm


def numpy_rope(x, positions, theta):
    """Rotate-half RoPE in float64: pairs (i, i + D/2) rotated by p * theta^(-2i/D)."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    angles = np.asarray(positions, np.float64)[:, :, None, None] * freqs  # [B, T, 1, D/2]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def test_rope_matches_numpy_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 37, 3, 12)).astype(np.float32)
    positions = rng.integers(0, 500, size=(2, 37)).astype(np.int32)
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), numpy_rope(x, positions, 10000.0), rtol=1e-4, atol=1e-4)


def test_rope_keeps_bfloat16_dtype_and_values():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 9, 2, 8)).astype(np.float32)
    positions = np.arange(9, dtype=np.int32)[None] + 3
    out = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(positions), 500.0)
    assert out.dtype == jnp.bfloat16
    expected = numpy_rope(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), positions, 500.0)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, atol=3e-2)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        rq = apply_rope(q, jnp.array([[m]]), 10000.0)
        rk = apply_rope(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(rq * rk))

    base = score(7, 3)
    assert abs(score(7 + 41, 3 + 41) - base) < 1e-4
    assert abs(score(7 + 113, 3 + 113) - base) < 1e-4
    assert abs(score(3, 7) - base) > 1e-3  # a different offset gives a different score


def test_rope_rejects_odd_head_dim_and_bad_positions():
    with pytest.raises(ValueError, match="even head dimension"):
        apply_rope(jnp.ones((1, 2, 1, 5)), jnp.zeros((1, 2), jnp.int32), 10000.0)
    with pytest.raises(ValueError, match="positions must have shape"):
        apply_rope(jnp.ones((1, 2, 1, 4)), jnp.zeros((1, 3), jnp.int32), 10000.0)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_rms_norm_matches_numpy(dtype, atol):
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(3, 11, 24)) * 3 + 0.5).astype(np.float32)
    scale = rng.normal(size=(24,)).astype(np.float32)
    x_in = jnp.asarray(x, dtype)
    out = rms_norm(x_in, jnp.asarray(scale), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    x64 = np.asarray(x_in.astype(jnp.float32), np.float64)
    expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, rtol=atol, atol=atol)


def test_rms_norm_rejects_wrong_scale_shape():
    with pytest.raises(ValueError, match="scale must have shape"):
        rms_norm(jnp.ones((2, 8)), jnp.ones((7,)), 1e-6)
