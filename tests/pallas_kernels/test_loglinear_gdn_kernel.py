"""Log-linear Gated DeltaNet Pallas kernels (interpret mode on CPU): the forward and every gradient through the
``custom_vjp`` (the default ``backward="kernels"``) against ``impl="recurrent"``, the level stack of the sequential
pass against a float64 delta-rule recurrence over each level's chunks, grouped heads, T not a multiple of the
chunk, both dtypes, clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.loglinear import loglinear_gated_delta_rule
from pallas_kernels.gdn.api import within_chunk_gates
from pallas_kernels.gdn.kernel_ut import ut_transform
from pallas_kernels.loglinear_gdn import LogLinearGDNBlocks, loglinear_gated_delta_rule_pallas
from pallas_kernels.loglinear_gdn.kernel_fwd import level_states
from pallas_kernels.registry import UnsupportedShapeError
from kernel_inputs import random_loglinear_gdn_inputs

CHUNK = 16


def random_inputs(seed, length, groups=1, heads=2, key_dim=16, value_dim=16):
    """``(q, k, v, log_a, beta, lam)`` float64 for one sequence, unit-norm keys, ``lam`` with one extra column."""
    return random_loglinear_gdn_inputs(seed, length, groups, heads, (length - 1).bit_length() + 2, key_dim,
                                       value_dim, max_log_decay=0.4)


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


def bfloat16_rounded(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)


@jax.jit
def pallas_vjp(arrays, d_out):
    """Outputs and input gradients of ``loglinear_gated_delta_rule_pallas`` (16-token chunks) for ``d_out``."""
    out, vjp = jax.vjp(lambda *x: loglinear_gated_delta_rule_pallas(*x, CHUNK), *arrays)
    return out, vjp(d_out)


@jax.jit
def recurrent_vjp(arrays, d_out):
    """Outputs and gradients of ``<o, dO>`` through ``impl="recurrent"`` (float32, full float32 products)."""
    with jax.default_matmul_precision("float32"):
        out, vjp = jax.vjp(lambda *x: loglinear_gated_delta_rule(*x, impl="recurrent"), *arrays)
        return out, vjp(d_out)


NAMES = ("dq", "dk", "dv", "dlog_a", "dbeta", "dlam")


@pytest.mark.parametrize("length, groups, heads", [(150, 1, 2), (11, 1, 1), (40, 2, 4)])
def test_forward_and_gradients_match_the_recurrent_reference(length, groups, heads):
    """16-token chunks: N = 10 (four chunk levels, merges up to level 3, grouped heads), N = 1 (no chunk
    level), N = 3 with two heads per group. λ has an extra (ignored) column."""
    inputs = random_inputs(length, length, groups, heads)
    arrays = [jnp.asarray(x, jnp.float32) for x in inputs]
    d_out = jnp.asarray(np.random.default_rng(length).normal(size=inputs[2].shape), jnp.float32)
    out, grads = pallas_vjp(arrays, d_out)
    expected_out, expected_grads = recurrent_vjp(arrays, d_out)
    assert out.shape == expected_out.shape and out.dtype == jnp.float32
    assert_close(out, expected_out, 1e-5)
    for name, grad, reference in zip(NAMES, grads, expected_grads):
        assert grad.shape == reference.shape, name
        assert_close(grad, reference, 1e-4)
    np.testing.assert_array_equal(np.asarray(grads[5][..., -1]), 0.0)


def float64_level_state(k, v, log_a, beta, first_chunk, end_chunk, until_chunk):
    """``Σ_{s in chunks [first, end)} A_{t} … A_{s+1} β_s k_s v_sᵀ`` at ``t`` = the last token before chunk
    ``until``, by the delta-rule recurrence ``S ← a_t (I − β_t k_t k_tᵀ) S + [s in range] β_t k_t v_tᵀ`` from zero;
    ``k [T, K]``, ``v [T, V]``, ``log_a, beta [T]`` -> ``[K, V]``."""
    state = np.zeros((k.shape[1], v.shape[1]))
    for t in range(until_chunk * CHUNK):
        state = np.exp(log_a[t]) * (state - beta[t] * np.outer(k[t], k[t] @ state))
        if first_chunk * CHUNK <= t < end_chunk * CHUNK:
            state = state + beta[t] * np.outer(k[t], v[t])
    return state


def test_level_stack_holds_each_fenwick_bucket_carried_through_every_transition():
    """Entering chunk n, level j holds the chunks ``[n_j − 2^j, n_j)`` (``n_j = (n >> j) << j``) when bit j of n
    is 1 and is zero otherwise. 12 chunks of 16, 32 value columns in two value blocks."""
    num_chunks, length = 12, 12 * CHUNK
    _, k, v, log_a, beta, _ = random_inputs(5, length, groups=1, heads=1, value_dim=32)
    cum = within_chunk_gates(jnp.asarray(log_a, jnp.float32), CHUNK, 0)  # [B, T, H]
    w, u0, decayed_keys = ut_transform(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                                       jnp.asarray(beta, jnp.float32), cum, chunk=CHUNK, sub_block=16)
    states = np.asarray(level_states(w, u0, decayed_keys, cum, chunk=CHUNK, value_block=16,
                                     state_dtype=jnp.float32))  # [B, H, N, Lc, K, V]
    assert states.shape == (1, 1, num_chunks, 4, 16, 32)
    for n in range(num_chunks):
        for level in range(4):
            if n >> level & 1:
                end = (n >> level) << level
                expected = float64_level_state(k[0, :, 0], v[0, :, 0], log_a[0, :, 0], beta[0, :, 0],
                                               end - (1 << level), end, n)
                assert_close(states[0, 0, n, level], expected, 1e-5)
            else:
                np.testing.assert_array_equal(states[0, 0, n, level], 0.0)


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = random_inputs(7, 37, groups=1, heads=2)
    arrays = [jnp.asarray(x, jnp.bfloat16) for x in inputs]
    d_out = np.random.default_rng(7).normal(size=inputs[2].shape)
    out, grads = pallas_vjp(arrays, jnp.asarray(d_out, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and [g.dtype for g in grads] == [jnp.bfloat16] * 6
    rounded = [jnp.asarray(bfloat16_rounded(x), jnp.float32) for x in inputs]
    expected_out, expected_grads = recurrent_vjp(rounded, jnp.asarray(bfloat16_rounded(d_out), jnp.float32))
    assert_close(out, expected_out, 1e-2)
    for name, grad, reference in zip(NAMES, grads, expected_grads):
        assert grad.shape == reference.shape, name
        assert_close(grad, reference, 1e-2)


def test_op_dispatch_uses_the_kernels():
    """``loglinear_gated_delta_rule(impl="pallas")`` with the backend's default chunk (T = 70: two chunks)."""
    arrays = [jnp.asarray(x, jnp.float32) for x in random_inputs(9, 70, groups=1, heads=2)]
    op = functools.partial(loglinear_gated_delta_rule, impl="pallas")
    out = jax.jit(op)(*arrays)
    with jax.default_matmul_precision("float32"):
        expected = loglinear_gated_delta_rule(*arrays, impl="recurrent")
    assert_close(out, expected, 1e-5)


def test_unsupported_inputs_raise_clear_errors():
    arrays = [jnp.asarray(x, jnp.float32) for x in random_inputs(0, 20, key_dim=24)]
    with pytest.raises(UnsupportedShapeError, match="key_dim=24 must be a power of two and a multiple of 16"):
        loglinear_gated_delta_rule(*arrays, impl="pallas")
    arrays = [jnp.asarray(x, jnp.float32) for x in random_inputs(0, 20)]
    with pytest.raises(UnsupportedShapeError, match="chunk_size=8 must be a power of two >= 16"):
        loglinear_gated_delta_rule_pallas(*arrays, 8)
    with pytest.raises(UnsupportedShapeError, match="state_value_block=48 must be a power of two >= 16 dividing"):
        loglinear_gated_delta_rule_pallas(*arrays, blocks=LogLinearGDNBlocks(chunk=16, state_value_block=48,
                                                                             output_value_block=16))
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]=\(1, 20\), got \(1, 19\)"):
        loglinear_gated_delta_rule_pallas(*arrays, segment_ids=jnp.zeros((1, 19), jnp.int32))
