"""SSD Pallas kernels on packed sequences (``segment_ids``, interpret mode on CPU): forward, final state and every
gradient against a float64 recurrence with state resets and against ``ssd(impl="recurrent")``; segments starting
mid-chunk, on a chunk edge, several in one chunk, one-token segments, T not a multiple of the chunk, grouped
heads, an initial state, both layouts and both dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxlm.ops.ssd import ssd
from pallas_kernels.ssd import ssd_blocks, ssd_pallas
from pallas_kernels.ssd.api import segment_runs
from kernel_inputs import jitted_outputs_and_vjp, packed_segment_ids, random_ssd_inputs

CHUNK = 16


def random_inputs(seed, batch=2, length=45, groups=2, heads=4, key_dim=16, value_dim=32):
    return random_ssd_inputs(seed, batch, length, groups, heads, key_dim, value_dim, with_cotangents=True)


def float64_reset_recurrence(q, k, v, log_a, initial, segment_ids):
    """``S_t = [no start at t] a_t S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` in numpy float64 (a start: the id
    differs from the previous token's). Returns the outputs and the final state."""
    heads, groups = v.shape[2], q.shape[2]
    group = np.arange(heads) // (heads // groups)
    state, outs = initial.astype(np.float64).copy(), []
    for t in range(q.shape[1]):
        keeps = np.ones(q.shape[0]) if t == 0 else (segment_ids[:, t] == segment_ids[:, t - 1]).astype(np.float64)
        decay = keeps[:, None] * np.exp(log_a[:, t])  # [B, H]
        state = decay[..., None, None] * state + np.einsum("bhk,bhv->bhkv", k[:, t][:, group], v[:, t])
        outs.append(np.einsum("bhkv,bhk->bhv", state, q[:, t][:, group]))
    return np.stack(outs, axis=1), state


def outputs_and_grads(inputs, cotangents, dtype, segment_ids, impl="kernel", **kwargs):
    """``(out, final)`` and the gradients of q, k, v, log_a, initial_state for the given cotangents, from
    ``ssd_pallas`` with 16-token chunks (``impl="kernel"``) or ``ssd(impl=impl)``."""
    arrays = [jnp.asarray(x, dtype) for x in inputs[:4]] + [jnp.asarray(inputs[4], jnp.float32)]
    cotangents = (jnp.asarray(cotangents[0], dtype), jnp.asarray(cotangents[1], jnp.float32))
    segments = None if segment_ids is None else jnp.asarray(segment_ids)

    def op(q, k, v, log_a, initial):
        if impl == "kernel":
            return ssd_pallas(q, k, v, log_a, initial, CHUNK, segment_ids=segments, **kwargs)
        return ssd(q, k, v, log_a, initial_state=initial, return_final_state=True, impl=impl,
                   segment_ids=segments)

    return jitted_outputs_and_vjp(op, arrays, cotangents)


def assert_close(actual, expected, tol, name=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, name
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=name)


GRAD_NAMES = ("dq", "dk", "dv", "dlog_a", "dinitial")


def assert_kernels_match_references(inputs, cotangents, segment_ids, **kwargs):
    """Kernel outputs (``outputs_and_grads`` with ``kwargs``) against the float64 reset recurrence, gradients
    against the recurrent op's."""
    (out, final), grads = outputs_and_grads(inputs, cotangents, jnp.float32, segment_ids, **kwargs)
    expected_out, expected_final = float64_reset_recurrence(*inputs, segment_ids)
    assert_close(out, expected_out, 1e-5, "out")
    assert_close(final, expected_final, 1e-5, "final")
    _, ref_grads = outputs_and_grads(inputs, cotangents, jnp.float32, segment_ids, "recurrent")
    for name, grad, reference in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(grad, reference, 1e-4, name)


def test_segment_runs_count_starts_inside_each_chunk():
    ids = jnp.asarray([[4, 4, 1, 1, 1, 2, 2, 2, 3, 5]])  # starts at 2, 5, 8, 9; chunk 4; T=10 padded to 12
    expected = [[0, 0, 1, 1, 0, 1, 1, 1, 1, 2, 2, 2]]
    np.testing.assert_array_equal(np.asarray(segment_runs(ids, 4)), expected)


def test_forward_and_gradients_match_the_recurrence_float32():
    inputs, cotangents = random_inputs(0)
    segment_ids = packed_segment_ids()
    (out, final), grads = outputs_and_grads(inputs, cotangents, jnp.float32, segment_ids)
    expected_out, expected_final = float64_reset_recurrence(*inputs, segment_ids)
    assert_close(out, expected_out, 1e-5, "out")
    assert_close(final, expected_final, 1e-5, "final")
    (ref_out, ref_final), ref_grads = outputs_and_grads(inputs, cotangents, jnp.float32, segment_ids, "recurrent")
    assert_close(ref_out, expected_out, 1e-5, "recurrent out")
    for name, grad, reference in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(grad, reference, 1e-4, name)


def test_bfloat16_inputs():
    inputs, cotangents = random_inputs(2, batch=2, length=37, groups=1, heads=2)
    segment_ids = packed_segment_ids(37)
    (out, final), grads = outputs_and_grads(inputs, cotangents, jnp.bfloat16, segment_ids)
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in inputs[:4]] + [inputs[4]]
    (_, _), ref_grads = outputs_and_grads(rounded, cotangents, jnp.float32, segment_ids, "recurrent")
    expected_out, expected_final = float64_reset_recurrence(*rounded, segment_ids)
    assert_close(out, expected_out, 1e-2, "out")
    assert_close(final, expected_final, 1e-2, "final")
    for name, grad, reference in zip(GRAD_NAMES, grads, ref_grads):
        assert grad.dtype == (jnp.float32 if name == "dinitial" else jnp.bfloat16), name
        assert_close(grad, reference, 1e-2, name)


def test_head_major_layout_and_split_state_tiles():
    """``time_major=False`` (the TPU layout) and 16 x 16 state tiles in the two sequential passes."""
    inputs, cotangents = random_inputs(3, batch=2, length=45, groups=1, heads=2, key_dim=32, value_dim=32)
    segment_ids = packed_segment_ids()
    blocks = dataclasses.replace(ssd_blocks(32, 32, CHUNK), key_block=16, value_block=16, time_major=False)
    assert_kernels_match_references(inputs, cotangents, segment_ids, blocks=blocks)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU interpreter runs on the CPU backend")
def test_tpu_interpret_mode_with_tpu_blocks():
    """Head-major layout and whole-head-dim (8 x 128 tiled) blocks, run by the TPU interpreter."""
    inputs, cotangents = random_inputs(7, batch=2, length=37, groups=1, heads=2, key_dim=128, value_dim=128)
    segment_ids = packed_segment_ids(37)
    blocks = ssd_blocks(128, 128, CHUNK, platform="tpu")
    assert_kernels_match_references(inputs, cotangents, segment_ids, blocks=blocks,
                                    interpret=pltpu.InterpretParams())


def test_equal_segment_ids_give_the_single_sequence_result():
    inputs, cotangents = random_inputs(4, batch=1, length=37, groups=1, heads=2)
    (out, final), grads = outputs_and_grads(inputs, cotangents, jnp.float32, np.full((1, 37), 3, np.int32))
    (plain_out, plain_final), plain_grads = outputs_and_grads(inputs, cotangents, jnp.float32, None)
    for name, a, b in zip(("out", "final") + GRAD_NAMES, (out, final, *grads), (plain_out, plain_final, *plain_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=name)


def test_op_dispatch_passes_segment_ids_to_the_kernels():
    """``ssd(impl="pallas")`` (the backend's own chunk) equals ``ssd(impl="recurrent")`` on packed rows."""
    inputs, cotangents = random_inputs(5, batch=2, length=45, groups=2, heads=4)
    segment_ids = packed_segment_ids()
    (out, final), grads = outputs_and_grads(inputs, cotangents, jnp.float32, segment_ids, "pallas")
    (ref_out, ref_final), ref_grads = outputs_and_grads(inputs, cotangents, jnp.float32, segment_ids, "recurrent")
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(final, ref_final, 1e-5, "final")
    for name, grad, reference in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(grad, reference, 1e-4, name)


def test_wrong_segment_ids_shape_raises_for_the_kernels():
    (q, k, v, log_a, _), _ = random_inputs(6, batch=2, length=9)
    q, k, v, log_a = (jnp.asarray(x, jnp.float32) for x in (q, k, v, log_a))
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]=\(2, 9\)"):
        ssd(q, k, v, log_a, impl="pallas", segment_ids=jnp.zeros((2, 8), jnp.int32))
    initial = jnp.zeros((2, 4, 16, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"ssd_pallas: segment_ids must be \[B, T\]=\(2, 9\), got \(9,\)"):
        ssd_pallas(q, k, v, log_a, initial, CHUNK, segment_ids=jnp.zeros((9,), jnp.int32))
