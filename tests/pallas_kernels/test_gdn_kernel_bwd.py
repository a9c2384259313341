"""Gated delta rule per-chunk gradient kernel (interpret mode on CPU): against the XLA VJP of ``chunk_local`` on
the same saved chunk quantities, and end to end against a float64 recurrence and the XLA chunked form."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.delta_rule import gated_delta_rule
from pallas_kernels.gdn import gated_delta_rule_pallas, gdn_blocks
from pallas_kernels.gdn.api import _gdn_forward
from pallas_kernels.gdn.chunk_local import chunk_local_outputs
from pallas_kernels.gdn.kernel_chunk_bwd import chunk_grads

from jaxlm.ops.delta_rule_chunked import pad_time
from kernel_inputs import random_gdn_inputs


def random_inputs(seed, batch, length, groups, heads, key_dim=16, value_dim=32, with_initial=True):
    """``kernel_inputs.random_gdn_inputs``; ``initial`` is None without an initial state."""
    return random_gdn_inputs(seed, batch, length, groups, heads, key_dim, value_dim,
                             initial="random" if with_initial else None)


def assert_close(actual, expected, tol, name):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=name)


def test_chunk_grads_match_the_vjp_of_chunk_local():
    """Same saved chunk quantities, arbitrary output and leaving-state cotangents: the kernel (value dim walked in
    two blocks, grouped heads, T not a multiple of the chunk) equals the XLA VJP of the per-chunk map."""
    chunk, length, groups, heads = 16, 40, 2, 4
    q, k, v, log_a, beta, initial = (jnp.asarray(x, jnp.float32)
                                     for x in random_inputs(3, 1, length, groups, heads))
    blocks = dataclasses.replace(gdn_blocks(16, 32, chunk), grad_value_block=16)
    rng = np.random.default_rng(4)
    d_out = jnp.asarray(rng.normal(size=v.shape), jnp.float32)  # [B, T, H, V]
    d_leaving = jnp.asarray(rng.normal(size=(1, heads, 3, 16, 32)), jnp.float32)  # [B, H, N, K, V]
    padding = -length % chunk

    @jax.jit
    def kernel_and_oracle(q, k, v, log_a, beta, initial, d_out, d_leaving):
        _, (states, _, _, cum, pseudo, inverse) = _gdn_forward(q, k, v, log_a, beta, initial, blocks,
                                                               store_inverse=True)
        kernel = chunk_grads(*(pad_time(x, padding) for x in (q, k, v)), pseudo, pad_time(d_out, padding),
                             pad_time(beta, padding), cum, inverse, states, d_leaving, chunk=chunk, value_block=16)
        _, vjp = jax.vjp(lambda *x: chunk_local_outputs(*x, states, chunk=chunk), q, k, v, log_a, beta)
        return kernel, vjp((d_out, d_leaving))

    with jax.default_matmul_precision("float32"):
        (dq, dk, dv, d_beta, d_log_a), expected = kernel_and_oracle(q, k, v, log_a, beta, initial, d_out, d_leaving)
    per_group = (1, length, groups, heads // groups, 16)
    actual = (dq[:, :length].reshape(per_group).sum(3), dk[:, :length].reshape(per_group).sum(3), dv[:, :length],
              d_log_a[:, :length], d_beta[:, :length])
    for name, got, want in zip(("dq", "dk", "dv", "d_log_a", "d_beta"), actual, expected):
        assert got.shape == want.shape, name
        assert_close(got, want, 1e-5, name)


def gradients(impl, inputs, dtype, with_final):
    """Every gradient of a loss that weighs each output (and, ``with_final``, each final-state) entry
    differently; ``inputs`` float64 numpy, cast to ``dtype`` (the initial state float32, or float64 for the
    recurrent oracle)."""
    state_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    operands = [jnp.asarray(x, dtype) for x in inputs[:5]]
    if inputs[5] is not None:
        operands.append(jnp.asarray(inputs[5], state_dtype))

    def loss(q, k, v, log_a, beta, initial=None):
        out, final = gated_delta_rule(q, k, v, log_a, beta, initial_state=initial, return_final_state=True,
                                      impl=impl, chunk_size=16)
        total = jnp.sum(jnp.sin(out.astype(state_dtype)))
        return total + jnp.sum(jnp.cos(final)) if with_final else total

    return jax.jit(jax.grad(loss, argnums=tuple(range(len(operands)))))(*operands)


def float64_gradients(inputs, with_final):
    with jax.enable_x64(True):
        return [np.asarray(g) for g in gradients("recurrent", inputs, jnp.float64, with_final)]


NAMES = ("dq", "dk", "dv", "d_log_a", "d_beta", "d_initial")


@pytest.mark.parametrize("length, groups, heads, with_initial, with_final", [
    (37, 2, 4, True, True),  # grouped heads, T not a multiple of the chunk, both state ends
    (29, 1, 2, False, False),  # no initial state, no final-state cotangent
])
def test_float32_gradients_match_float64_recurrence_and_chunked_form(length, groups, heads, with_initial,
                                                                     with_final):
    inputs = random_inputs(length, 2, length, groups, heads, with_initial=with_initial)
    with jax.default_matmul_precision("float32"):  # the XLA chunked form: no TF32 on GPU
        kernel = gradients("pallas", inputs, jnp.float32, with_final)
        chunked = gradients("chunked", inputs, jnp.float32, with_final)
    exact = float64_gradients(inputs, with_final)
    assert len(kernel) == len(exact) == (6 if with_initial else 5)
    for name, got, same_form, want in zip(NAMES, kernel, chunked, exact):
        assert got.dtype == jnp.float32, name
        assert_close(got, want, 1e-4, name)
        assert_close(got, same_form, 1e-5, name)


def test_bfloat16_gradients_match_float64_recurrence():
    """bf16 operands and saved quantities, float32 accumulation, grouped heads, no initial state."""
    inputs = random_inputs(12, 1, 35, 1, 2, with_initial=False)
    kernel = gradients("pallas", inputs, jnp.bfloat16, True)
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in inputs[:5]] + [None]
    for name, got, want in zip(NAMES, kernel, float64_gradients(rounded, True)):
        assert got.dtype == jnp.bfloat16, name
        assert_close(got, want, 1e-2, name)


@pytest.mark.parametrize("field", ["grad_float32_dots", "transform_float32_dots"])
def test_unknown_float32_dots_raise_a_clear_error(field):
    q, k, v, log_a, beta, initial = (jnp.asarray(x, jnp.float32) for x in random_inputs(0, 1, 8, 1, 1))
    blocks = dataclasses.replace(gdn_blocks(16, 32, 16), **{field: "tf32"})
    with pytest.raises(ValueError, match=f"{field}='tf32' must be one of \\('ieee', 'tf32x3'\\)"):
        gated_delta_rule_pallas(q, k, v, log_a, beta, initial, blocks=blocks)
