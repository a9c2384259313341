"""Gated delta rule Pallas kernels (interpret mode on CPU) against a float64 recurrence and the XLA chunked form."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.delta_rule import gated_delta_rule
from pallas_kernels.gdn import GDNBlocks, gated_delta_rule_pallas, gdn_blocks
from pallas_kernels.triangular import unit_lower_inverse
from pallas_kernels.registry import UnsupportedShapeError
from kernel_inputs import random_gdn_inputs


def random_inputs(seed, batch=2, length=45, groups=1, heads=2, key_dim=16, value_dim=32, with_initial=True):
    """``kernel_inputs.random_gdn_inputs`` with a zero initial state when ``with_initial`` is False."""
    return random_gdn_inputs(seed, batch, length, groups, heads, key_dim, value_dim,
                             initial="random" if with_initial else "zeros")


def float64_recurrence(q, k, v, log_a, beta, initial):
    """``S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` token by token in float64."""
    heads, groups = v.shape[2], q.shape[2]
    group = np.arange(heads) // (heads // groups)
    state, outs = initial.astype(np.float64).copy(), []
    for t in range(q.shape[1]):
        q_t, k_t = q[:, t][:, group], k[:, t][:, group]  # [B, H, K]
        b_t = beta[:, t][..., None]  # [B, H, 1]
        erased = state - np.einsum("bhk,bhv->bhkv", b_t * k_t, np.einsum("bhk,bhkv->bhv", k_t, state))
        state = np.exp(log_a[:, t])[..., None, None] * erased + np.einsum("bhk,bhv->bhkv", b_t * k_t, v[:, t])
        outs.append(np.einsum("bhkv,bhk->bhv", state, q_t))
    return np.stack(outs, axis=1), state


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


def as_jax(inputs, dtype=jnp.float32):
    """Kernel operands in ``dtype``; the initial state stays float32."""
    return tuple(jnp.asarray(x, dtype) for x in inputs[:5]) + (jnp.asarray(inputs[5], jnp.float32),)


@pytest.mark.parametrize("size, scale", [(16, 0.5), (32, 0.3)])
def test_unit_lower_inverse_matches_numpy(size, scale):
    rng = np.random.default_rng(size)
    strict_lower = np.tril(rng.normal(size=(size, size)) * scale, -1)
    inverse = unit_lower_inverse(jnp.asarray(strict_lower, jnp.float32))
    assert_close(inverse, np.linalg.inv(np.eye(size) + strict_lower), 1e-5)


@pytest.mark.parametrize("length, chunk, groups, heads, with_initial", [
    (64, 32, 2, 4, False),  # grouped heads, two sub-blocks per chunk, no initial state
    (100, 64, 1, 2, True),  # T not a multiple of the chunk; four 16-row sub-blocks merged per chunk
])
def test_forward_matches_float64_recurrence(length, chunk, groups, heads, with_initial):
    inputs = random_inputs(length, length=length, groups=groups, heads=heads, with_initial=with_initial)
    out, final = jax.jit(gated_delta_rule_pallas, static_argnums=6)(*as_jax(inputs), chunk)
    expected_out, expected_final = float64_recurrence(*inputs)
    assert out.shape == expected_out.shape and final.shape == expected_final.shape
    assert out.dtype == jnp.float32 and final.dtype == jnp.float32
    assert_close(out, expected_out, 2e-5)
    assert_close(final, expected_final, 2e-5)


def test_value_blocks_split_wide_heads():
    """Head dims of 128 split into eight 16-column blocks in the state pass and two 64-column blocks in the
    output pass."""
    inputs = random_inputs(11, batch=1, length=20, heads=2, key_dim=128, value_dim=128)
    blocks = GDNBlocks(chunk=16, state_value_block=16, output_value_block=64)
    out, final = gated_delta_rule_pallas(*as_jax(inputs), blocks=blocks)
    expected_out, expected_final = float64_recurrence(*inputs)
    assert_close(out, expected_out, 2e-5)
    assert_close(final, expected_final, 2e-5)


def loss_and_outputs(impl, q, k, v, log_a, beta, initial, chunk=16):
    """A loss that weighs every output and final-state entry differently, and ``(o, final state)``."""
    out, final = gated_delta_rule(q, k, v, log_a, beta, initial_state=initial, return_final_state=True, impl=impl,
                                  chunk_size=chunk)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))) + jnp.sum(jnp.cos(final)), (out, final)


def loss(impl, *inputs):
    return loss_and_outputs(impl, *inputs)[0]


ARGNUMS = (0, 1, 2, 3, 4, 5)


def float64_gradients(inputs):
    """Every gradient of ``loss`` through the recurrent form, in float64."""
    with jax.enable_x64(True):
        return jax.grad(lambda *a: loss("recurrent", *a), argnums=ARGNUMS)(
            *(jnp.asarray(x, jnp.float64) for x in inputs))


def test_gradients_match_float64_recurrence_and_the_chunked_form():
    """Both backwards: the kernels' (op default) and the chunked form's VJP (``backward="reference"``)."""
    inputs = random_inputs(5, length=37, groups=2, heads=4)  # T not a multiple of the chunk, grouped heads
    reference_blocks = dataclasses.replace(gdn_blocks(16, 32, 16), backward="reference")

    def reference_backward_loss(*a):
        out, final = gated_delta_rule_pallas(*a, blocks=reference_blocks)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(final))

    with jax.default_matmul_precision("float32"):  # the XLA backward: no TF32 on GPU
        grads = jax.jit(jax.grad(lambda *a: loss("pallas", *a), argnums=ARGNUMS))(*as_jax(inputs))
        reference_grads = jax.jit(jax.grad(reference_backward_loss, argnums=ARGNUMS))(*as_jax(inputs))
        chunked = jax.jit(jax.grad(lambda *a: loss("chunked", *a), argnums=ARGNUMS))(*as_jax(inputs))
    expected = float64_gradients(inputs)
    for grad, reference_grad, same_form, exact in zip(grads, reference_grads, chunked, expected):
        assert grad.dtype == jnp.float32
        assert_close(grad, exact, 1e-4)
        assert_close(grad, same_form, 1e-5)
        assert_close(reference_grad, same_form, 1e-5)


def test_bfloat16_outputs_and_gradients_match_float64_recurrence():
    """bf16 operands, float32 accumulation: outputs, final state and every gradient within 1e-2."""
    inputs = random_inputs(8, length=30, groups=1, heads=2)
    grad_fn = jax.grad(lambda *a: loss_and_outputs("pallas", *a), argnums=ARGNUMS, has_aux=True)
    grads, (out, final) = jax.jit(grad_fn)(*as_jax(inputs, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in inputs[:5]] + [inputs[5]]
    expected_out, expected_final = float64_recurrence(*rounded)
    assert_close(out, expected_out, 1e-2)
    assert_close(final, expected_final, 1e-2)
    for grad, reference in zip(grads, float64_gradients(rounded)):
        assert_close(grad, reference, 1e-2)


def test_unsupported_shapes_raise_clear_errors():
    q, k, v, log_a, beta, initial = as_jax(random_inputs(0, key_dim=24))
    with pytest.raises(UnsupportedShapeError, match="key_dim=24 must be a power of two and a multiple of 16"):
        gated_delta_rule_pallas(q, k, v, log_a, beta, initial)
    q, k, v, log_a, beta, initial = as_jax(random_inputs(0, value_dim=8))
    with pytest.raises(UnsupportedShapeError, match="value_dim=8 must be a power of two and a multiple of 16"):
        gated_delta_rule(q, k, v, log_a, beta, impl="pallas")
    q, k, v, log_a, beta, initial = as_jax(random_inputs(0))
    with pytest.raises(UnsupportedShapeError, match="chunk_size=8 must be a power of two >= 16"):
        gated_delta_rule_pallas(q, k, v, log_a, beta, initial, 8)
    with pytest.raises(UnsupportedShapeError, match="output_value_block=24 must be >= 16 and divide value_dim=32"):
        gated_delta_rule_pallas(q, k, v, log_a, beta, initial, blocks=GDNBlocks(16, 16, 24))

