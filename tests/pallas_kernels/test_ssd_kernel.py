"""SSD Pallas kernels (interpret mode on CPU) against the float64 recurrence and the XLA chunked form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.ssd import ssd
from pallas_kernels.registry import UnsupportedShapeError
from pallas_kernels.ssd import ssd_pallas


def random_inputs(seed, batch=2, length=45, groups=1, heads=2, key_dim=16, value_dim=32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, groups, key_dim)) / np.sqrt(key_dim)
    k = rng.normal(size=(batch, length, groups, key_dim)) / np.sqrt(key_dim)
    v = rng.normal(size=(batch, length, heads, value_dim))
    log_a = -rng.uniform(0.01, 0.6, size=(batch, length, heads))
    initial = rng.normal(size=(batch, heads, key_dim, value_dim))
    return q, k, v, log_a, initial


def float64_recurrence(q, k, v, log_a, initial):
    """``S_t = a_t S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` token by token in numpy float64."""
    heads, groups = v.shape[2], q.shape[2]
    group = np.arange(heads) // (heads // groups)
    state, outs = initial.astype(np.float64).copy(), []
    for t in range(q.shape[1]):
        state = np.exp(log_a[:, t])[..., None, None] * state + np.einsum(
            "bhk,bhv->bhkv", k[:, t][:, group], v[:, t])
        outs.append(np.einsum("bhkv,bhk->bhv", state, q[:, t][:, group]))
    return np.stack(outs, axis=1), state


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("length, chunk, groups, heads", [(45, 16, 1, 2), (64, 32, 2, 4), (7, 16, 2, 2)])
def test_forward_matches_float64_recurrence(length, chunk, groups, heads):
    inputs = random_inputs(length, length=length, groups=groups, heads=heads)
    out, final = jax.jit(ssd_pallas, static_argnums=5)(*(jnp.asarray(x, jnp.float32) for x in inputs), chunk)
    expected_out, expected_final = float64_recurrence(*inputs)
    assert out.shape == expected_out.shape and final.shape == expected_final.shape
    assert_close(out, expected_out, 1e-5)
    assert_close(final, expected_final, 1e-5)


def test_state_tiles_split_over_key_and_value_blocks():
    """Head dims of 128 are split into 64 x 64 state tiles on GPU/CPU (2 x 2 programs per head)."""
    inputs = random_inputs(11, length=20, heads=2, key_dim=128, value_dim=128)
    out, final = ssd_pallas(*(jnp.asarray(x, jnp.float32) for x in inputs), 16)
    expected_out, expected_final = float64_recurrence(*inputs)
    assert_close(out, expected_out, 1e-5)
    assert_close(final, expected_final, 1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = random_inputs(3)
    q, k, v, log_a = (jnp.asarray(x, jnp.bfloat16) for x in inputs[:4])
    initial = jnp.asarray(inputs[4], jnp.float32)
    out, final = ssd_pallas(q, k, v, log_a, initial, 16)
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in inputs[:4]] + [inputs[4]]
    expected_out, expected_final = float64_recurrence(*rounded)
    assert_close(out, expected_out, 2e-2)
    assert_close(final, expected_final, 2e-2)


def test_op_dispatch_and_gradients_equal_the_chunked_form():
    q, k, v, log_a, initial = (jnp.asarray(x, jnp.float32) for x in random_inputs(5, length=37, groups=1, heads=2))

    def loss(impl, q, k, v, log_a, initial):
        out, final = ssd(q, k, v, log_a, initial_state=initial, return_final_state=True, impl=impl, chunk_size=16)
        return jnp.sum(jnp.sin(out)) + jnp.sum(final ** 2)

    with jax.default_matmul_precision("float32"):  # the XLA backward and reference: no TF32 on GPU
        grads = jax.grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2, 3, 4))(q, k, v, log_a, initial)
        expected = jax.grad(lambda *a: loss("recurrent", *a), argnums=(0, 1, 2, 3, 4))(q, k, v, log_a, initial)
    for grad, reference in zip(grads, expected):
        assert_close(grad, reference, 1e-4)


def test_unsupported_head_dims_raise_a_clear_error():
    q, k, v, log_a, initial = (jnp.asarray(x, jnp.float32) for x in random_inputs(0, key_dim=24))
    with pytest.raises(UnsupportedShapeError, match="key_dim=24 must be a power of two"):
        ssd_pallas(q, k, v, log_a, initial)
    q, k, v, log_a, initial = (jnp.asarray(x, jnp.float32) for x in random_inputs(0))
    with pytest.raises(UnsupportedShapeError, match="chunk_size=8 must be a power of two >= 16"):
        ssd_pallas(q, k, v, log_a, initial, 8)
