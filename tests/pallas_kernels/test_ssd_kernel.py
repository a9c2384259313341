"""SSD Pallas kernels (interpret mode on CPU) against the float64 recurrence, its hand-derived backward, and the
XLA chunked form: forward, every gradient, grouped heads, T not a multiple of the chunk, both dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxlm.ops.ssd import ssd
from pallas_kernels.registry import UnsupportedShapeError
from pallas_kernels.ssd import ssd_blocks, ssd_pallas
from pallas_kernels.ssd.blocks import SSDBlocks
from kernel_inputs import random_ssd_inputs


def random_inputs(seed, batch=2, length=45, groups=1, heads=2, key_dim=16, value_dim=32):
    return random_ssd_inputs(seed, batch, length, groups, heads, key_dim, value_dim)


def random_cotangents(seed, inputs):
    """Random ``(dO [B, T, H, V], dS_final [B, H, K, V])``."""
    rng = np.random.default_rng(seed + 1000)
    v, initial = inputs[2], inputs[4]
    return rng.normal(size=v.shape), rng.normal(size=initial.shape)


def float64_recurrence(q, k, v, log_a, initial):
    """``S_t = a_t S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` token by token in numpy float64; also every state."""
    heads, groups = v.shape[2], q.shape[2]
    group = np.arange(heads) // (heads // groups)
    state, outs, states = initial.astype(np.float64).copy(), [], []
    for t in range(q.shape[1]):
        state = np.exp(log_a[:, t])[..., None, None] * state + np.einsum(
            "bhk,bhv->bhkv", k[:, t][:, group], v[:, t])
        outs.append(np.einsum("bhkv,bhk->bhv", state, q[:, t][:, group]))
        states.append(state)
    return np.stack(outs, axis=1), state, states


def float64_recurrence_grads(inputs, dout, dfinal):
    """Reverse-mode of the recurrence by hand, token by token backwards, in float64:
    ``dS += q_t dO_tᵀ``; ``dq_t = S_t dO_t``, ``dk_t = dS v_t``, ``dv_t = dSᵀ k_t``,
    ``d log_a_t = a_t <dS, S_{t-1}>``; ``dS ← a_t dS``; the initial-state gradient is the last ``dS``.
    dq, dk are summed over the heads of each group."""
    q, k, v, log_a, initial = inputs
    heads, groups = v.shape[2], q.shape[2]
    group = np.arange(heads) // (heads // groups)
    _, _, states = float64_recurrence(*inputs)
    states = [initial.astype(np.float64)] + states  # states[t + 1] = S_t
    dq_heads, dk_heads = np.zeros(q.shape[:2] + (heads, q.shape[3])), np.zeros(q.shape[:2] + (heads, q.shape[3]))
    dv, dlog_a = np.zeros(v.shape), np.zeros(log_a.shape)
    dstate = dfinal.astype(np.float64).copy()
    for t in reversed(range(q.shape[1])):
        q_t, k_t = q[:, t][:, group], k[:, t][:, group]  # [B, H, K]
        dstate = dstate + np.einsum("bhk,bhv->bhkv", q_t, dout[:, t])
        dq_heads[:, t] = np.einsum("bhkv,bhv->bhk", states[t + 1], dout[:, t])
        dk_heads[:, t] = np.einsum("bhkv,bhv->bhk", dstate, v[:, t])
        dv[:, t] = np.einsum("bhkv,bhk->bhv", dstate, k_t)
        decay = np.exp(log_a[:, t])  # [B, H]
        dlog_a[:, t] = decay * np.einsum("bhkv,bhkv->bh", dstate, states[t])
        dstate = decay[..., None, None] * dstate
    batch, length, _, key_dim = q.shape
    group_sum = lambda x: x.reshape(batch, length, groups, heads // groups, key_dim).sum(axis=3)  # noqa: E731
    return group_sum(dq_heads), group_sum(dk_heads), dv, dlog_a, dstate


def pallas_vjp(inputs, cotangents, chunk, dtype=jnp.float32, **kwargs):
    """Outputs and input gradients of ``ssd_pallas`` for the given cotangents (one jitted call)."""
    arrays = [jnp.asarray(x, dtype) for x in inputs[:4]] + [jnp.asarray(inputs[4], jnp.float32)]
    dout, dfinal = cotangents

    @jax.jit
    def outputs_and_grads(arrays, cotangents):
        outputs, vjp = jax.vjp(lambda *x: ssd_pallas(*x, chunk, **kwargs), *arrays)
        return outputs, vjp(cotangents)

    return outputs_and_grads(arrays, (jnp.asarray(dout, dtype), jnp.asarray(dfinal, jnp.float32)))


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


def bfloat16_rounded(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)


@pytest.mark.parametrize("length, chunk, groups, heads", [(45, 16, 1, 2), (64, 32, 2, 4), (7, 16, 2, 2)])
def test_forward_matches_float64_recurrence(length, chunk, groups, heads):
    inputs = random_inputs(length, length=length, groups=groups, heads=heads)
    out, final = jax.jit(ssd_pallas, static_argnums=5)(*(jnp.asarray(x, jnp.float32) for x in inputs), chunk)
    expected_out, expected_final, _ = float64_recurrence(*inputs)
    assert out.shape == expected_out.shape and final.shape == expected_final.shape
    assert_close(out, expected_out, 1e-5)
    assert_close(final, expected_final, 1e-5)


@pytest.mark.parametrize("length, chunk, groups, heads, with_initial, with_final_cotangent",
                         [(45, 16, 1, 2, True, True), (37, 16, 2, 6, False, False)])
def test_gradients_match_the_float64_backward_of_the_recurrence(length, chunk, groups, heads, with_initial,
                                                                 with_final_cotangent):
    inputs = random_inputs(length + 1, batch=1, length=length, groups=groups, heads=heads)
    dout, dfinal = random_cotangents(length, inputs)
    inputs = inputs[:4] + (inputs[4] if with_initial else np.zeros_like(inputs[4]),)
    cotangents = (dout, dfinal if with_final_cotangent else np.zeros_like(dfinal))
    _, grads = pallas_vjp(inputs, cotangents, chunk)
    expected = float64_recurrence_grads(inputs, *cotangents)
    for name, grad, reference in zip(("dq", "dk", "dv", "dlog_a", "dinitial"), grads, expected):
        assert grad.shape == reference.shape, name
        assert_close(grad, reference, 1e-4)


def test_op_gradients_equal_the_chunked_form():
    """Through ``ssd(impl="pallas")``: no initial state (zeros), a loss on the outputs and the final state."""
    q, k, v, log_a = (jnp.asarray(x, jnp.float32) for x in random_inputs(5, batch=1, length=37, groups=2,
                                                                         heads=4)[:4])

    def loss(impl, q, k, v, log_a):
        out, final = ssd(q, k, v, log_a, return_final_state=True, impl=impl, chunk_size=16)
        return jnp.sum(jnp.sin(out)) + jnp.sum(final ** 2)

    with jax.default_matmul_precision("float32"):  # the XLA reference: no TF32 on GPU
        grads = jax.jit(jax.grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2, 3)))(q, k, v, log_a)
        expected = jax.jit(jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2, 3)))(q, k, v, log_a)
    for grad, reference in zip(grads, expected):
        assert_close(grad, reference, 1e-4)


def test_state_tiles_split_over_key_and_value_blocks():
    """Head dims of 128 are split into 32 x 64 state tiles on GPU/CPU (4 x 2 programs per head), both passes."""
    inputs = random_inputs(11, batch=1, length=20, heads=2, key_dim=128, value_dim=128)
    cotangents = random_cotangents(11, inputs)
    (out, final), grads = pallas_vjp(inputs, cotangents, 16)
    expected_out, expected_final, _ = float64_recurrence(*inputs)
    assert_close(out, expected_out, 1e-5)
    assert_close(final, expected_final, 1e-5)
    for grad, reference in zip(grads, float64_recurrence_grads(inputs, *cotangents)):
        assert_close(grad, reference, 1e-4)


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = random_inputs(3, batch=1, length=45, groups=1, heads=2)
    cotangents = random_cotangents(3, inputs)
    (out, final), grads = pallas_vjp(inputs, cotangents, 16, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 4 + [jnp.float32]
    rounded = [bfloat16_rounded(x) for x in inputs[:4]] + [inputs[4]]
    expected_out, expected_final, _ = float64_recurrence(*rounded)
    assert_close(out, expected_out, 1e-2)
    assert_close(final, expected_final, 1e-2)
    expected = float64_recurrence_grads(rounded, bfloat16_rounded(cotangents[0]), cotangents[1])
    for grad, reference in zip(grads, expected):
        assert_close(grad, reference, 1e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU interpreter runs on the CPU backend")
def test_tpu_interpret_mode_with_tpu_blocks():
    """Head-major layout and whole-head-dim (8 x 128 tiled) blocks, run by the TPU interpreter."""
    inputs = random_inputs(13, batch=1, length=20, heads=2, key_dim=128, value_dim=128)
    cotangents = random_cotangents(13, inputs)
    blocks = ssd_blocks(128, 128, 16, platform="tpu")
    assert not blocks.time_major and (blocks.key_block, blocks.value_block) == (128, 128)
    (out, final), grads = pallas_vjp(inputs, cotangents, 16, blocks=blocks, interpret=pltpu.InterpretParams())
    expected_out, expected_final, _ = float64_recurrence(*inputs)
    assert_close(out, expected_out, 1e-5)
    assert_close(final, expected_final, 1e-5)
    for grad, reference in zip(grads, float64_recurrence_grads(inputs, *cotangents)):
        assert_close(grad, reference, 1e-4)


def test_unsupported_head_dims_and_blocks_raise_a_clear_error():
    q, k, v, log_a, initial = (jnp.asarray(x, jnp.float32) for x in random_inputs(0, key_dim=24))
    with pytest.raises(UnsupportedShapeError, match="key_dim=24 must be a power of two"):
        ssd_pallas(q, k, v, log_a, initial)
    q, k, v, log_a, initial = (jnp.asarray(x, jnp.float32) for x in random_inputs(0))
    with pytest.raises(UnsupportedShapeError, match="chunk_size=8 must be a power of two >= 16"):
        ssd_pallas(q, k, v, log_a, initial, 8)
    with pytest.raises(UnsupportedShapeError, match="value_block=48 must be >= 16 and divide 32"):
        ssd_pallas(q, k, v, log_a, initial, blocks=SSDBlocks(chunk=16, value_block=48, key_block=16,
                                                             output_value_block=32))
