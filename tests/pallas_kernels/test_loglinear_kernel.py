"""Log-linear SSD Pallas kernels (interpret mode on CPU) against a float64 brute-force oracle of
``o_t = Σ_{s≤t} λ_t^{level(t,s)} exp(Σ_{r=s+1..t} log_a_r) (q_t·k_s) v_s``, the level states of the fused pass
against their definition, and gradients (the backward kernels, and the reference backward) against
``impl="recurrent"``: grouped heads, T not a multiple of the chunk and not a power of two, both dtypes, clear
errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.loglinear import loglinear_ssd
from pallas_kernels.loglinear import LogLinearBlocks, loglinear_blocks, loglinear_ssd_pallas
from pallas_kernels.loglinear.api import level_inputs
from pallas_kernels.loglinear.kernel_fwd import level_states
from pallas_kernels.registry import UnsupportedShapeError


def random_inputs(seed, length, groups=1, heads=2, key_dim=16, value_dim=16, extra_levels=1):
    """``(q, k, v, log_a, lam)`` for one sequence; ``lam`` has ``num_levels(T) + extra_levels`` columns."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, length, groups, key_dim)) / np.sqrt(key_dim)
    k = rng.normal(size=(1, length, groups, key_dim)) / np.sqrt(key_dim)
    v = rng.normal(size=(1, length, heads, value_dim))
    log_a = -rng.uniform(0.01, 0.4, size=(1, length, heads))
    lam = rng.uniform(0.2, 1.8, size=(1, length, heads, (length - 1).bit_length() + 1 + extra_levels))
    return q, k, v, log_a, lam


def float64_loglinear(q, k, v, log_a, lam):
    """The dense masked form ``(Q Kᵀ ⊙ M^S ⊙ M^H) V`` in numpy float64, ``level(t, s) = bit_length(t XOR s)``."""
    length, groups, heads = q.shape[1], q.shape[2], v.shape[2]
    group = np.arange(heads) // (heads // groups)
    q, k = q[:, :, group], k[:, :, group]  # [B, T, H, K]
    positions = np.arange(length)
    level = np.array([[int(t ^ s).bit_length() for s in positions] for t in positions])  # [T, T]
    causal = positions[:, None] >= positions[None, :]
    gates = np.cumsum(log_a, axis=1)  # [B, T, H]
    gap = np.where(causal[None, :, :, None], gates[:, :, None] - gates[:, None, :], -np.inf)  # [B, T, S, H]
    level_weights = np.moveaxis(lam, 3, 2)[:, positions[:, None], level, :]  # [B, T, S, H]
    scores = np.einsum("bthk,bshk->btsh", q, k) * np.exp(gap) * level_weights
    return np.einsum("btsh,bshv->bthv", scores, v)


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


def bfloat16_rounded(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)


@functools.partial(jax.jit, static_argnums=(2, 3))
def pallas_vjp(arrays, d_out, chunk, backward="kernels"):
    """Outputs and input gradients of ``loglinear_ssd_pallas`` for the cotangent ``d_out`` (one jitted call)."""
    blocks = dataclasses.replace(loglinear_blocks(arrays[0].shape[-1], arrays[2].shape[-1], chunk), backward=backward)
    out, vjp = jax.vjp(lambda *x: loglinear_ssd_pallas(*x, blocks=blocks), *arrays)
    return out, vjp(d_out)


@jax.jit
def recurrent_grads(arrays, d_out):
    """Gradients of ``<o, dO>`` through ``impl="recurrent"`` (float32, full float32 products)."""
    with jax.default_matmul_precision("float32"):
        _, vjp = jax.vjp(lambda *x: loglinear_ssd(*x, impl="recurrent"), *arrays)
        return vjp(d_out)


@pytest.mark.parametrize("length, groups, heads, backward",
                         [(150, 2, 4, "kernels"), (11, 1, 1, "kernels"), (37, 1, 2, "reference")])
def test_forward_and_gradients_match_the_references(length, groups, heads, backward):
    """16-token chunks: N = 10 (four chunk levels, two of them merged on chip), N = 1 (no chunk level), N = 3.
    Forward vs the float64 oracle; every gradient through ``custom_vjp`` vs ``impl="recurrent"``, λ with an
    extra (ignored) column."""
    inputs = random_inputs(length, length, groups, heads)
    arrays = [jnp.asarray(x, jnp.float32) for x in inputs]
    d_out = jnp.asarray(np.random.default_rng(length).normal(size=inputs[2].shape), jnp.float32)
    out, grads = pallas_vjp(arrays, d_out, 16, backward)
    expected = float64_loglinear(*inputs)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    assert_close(out, expected, 1e-5)
    for name, grad, reference in zip(("dq", "dk", "dv", "dlog_a", "dlam"), grads, recurrent_grads(arrays, d_out)):
        assert grad.shape == reference.shape, name
        assert_close(grad, reference, 1e-4)
    np.testing.assert_array_equal(np.asarray(grads[4][..., -1]), 0.0)


def test_level_states_are_the_fenwick_buckets_of_each_chunk_boundary():
    """Slot ``b`` holds ``Σ_s exp(G_{bC−1} − G_s) k_s v_sᵀ`` over the chunks ``[b − 2^{lssb b}, b)``; slot 0
    zeros. 13 chunks of 16 with 32 x 16 state tiles split over key and value blocks."""
    chunk, num_chunks = 16, 13
    _, k, v, log_a, lam = random_inputs(3, chunk * num_chunks, groups=1, heads=2, key_dim=64, value_dim=32)
    cum = level_inputs(jnp.asarray(log_a), jnp.asarray(lam), chunk, 0).cum  # [B, H, T]
    states = jax.jit(lambda k, v, cum: level_states(k, v, cum, chunk=chunk, key_block=32, value_block=16))(
        jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), cum)
    gates = np.cumsum(log_a, axis=1)  # [B, T, H]
    np.testing.assert_array_equal(np.asarray(states[:, :, 0]), 0.0)
    for boundary in range(1, num_chunks):
        span = boundary & -boundary
        keys = np.arange((boundary - span) * chunk, boundary * chunk)
        weights = np.exp(gates[:, boundary * chunk - 1, None] - gates[:, keys])  # [B, S, H]
        expected = np.einsum("bsh,bsk,bshv->bhkv", weights, k[:, keys, 0], v[:, keys])
        assert_close(states[:, :, boundary], expected, 1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = random_inputs(7, 37, groups=1, heads=2)
    arrays = [jnp.asarray(x, jnp.bfloat16) for x in inputs]
    d_out = np.random.default_rng(7).normal(size=inputs[2].shape)
    out, grads = pallas_vjp(arrays, jnp.asarray(d_out, jnp.bfloat16), 16)
    assert out.dtype == jnp.bfloat16 and [g.dtype for g in grads] == [jnp.bfloat16] * 5
    rounded = [bfloat16_rounded(x) for x in inputs]
    assert_close(out, float64_loglinear(*rounded), 1e-2)
    expected = recurrent_grads([jnp.asarray(x, jnp.float32) for x in rounded],
                               jnp.asarray(bfloat16_rounded(d_out), jnp.float32))
    for grad, reference in zip(grads, expected):
        assert_close(grad, reference, 1e-2)


def test_op_dispatch_uses_the_kernels():
    """``loglinear_ssd(impl="pallas")`` with the backend's default chunk (T = 70: two chunks on CPU)."""
    inputs = random_inputs(9, 70, groups=1, heads=2)
    out = jax.jit(lambda *x: loglinear_ssd(*x, impl="pallas"))(*(jnp.asarray(x, jnp.float32) for x in inputs))
    assert_close(out, float64_loglinear(*inputs), 1e-5)


def test_unsupported_inputs_raise_clear_errors():
    q, k, v, log_a, lam = (jnp.asarray(x, jnp.float32) for x in random_inputs(0, 20, key_dim=24))
    with pytest.raises(UnsupportedShapeError, match="key_dim=24 must be a power of two and a multiple of 16"):
        loglinear_ssd(q, k, v, log_a, lam, impl="pallas")
    q, k, v, log_a, lam = (jnp.asarray(x, jnp.float32) for x in random_inputs(0, 20))
    with pytest.raises(UnsupportedShapeError, match="chunk_size=8 must be a power of two >= 16"):
        loglinear_ssd_pallas(q, k, v, log_a, lam, 8)
    with pytest.raises(UnsupportedShapeError, match="value_block=48 must be a power of two >= 16 dividing 16"):
        loglinear_ssd_pallas(q, k, v, log_a, lam, blocks=LogLinearBlocks(chunk=16, key_block=16, value_block=48,
                                                                          output_value_block=16))
    with pytest.raises(ValueError, match="backward='xla' must be one of"):
        loglinear_ssd_pallas(q, k, v, log_a, lam, blocks=LogLinearBlocks(chunk=16, key_block=16, value_block=16,
                                                                          output_value_block=16, backward="xla"))
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]=\(1, 20\), got \(1, 19\)"):
        loglinear_ssd_pallas(q, k, v, log_a, lam, segment_ids=jnp.zeros((1, 19), jnp.int32))
