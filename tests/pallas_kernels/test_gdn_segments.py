"""Gated delta rule Pallas kernels on packed sequences (``segment_ids``, interpret mode on CPU): forward, final state
and every gradient against a float64 recurrence with state resets (``gated_delta_rule(impl="recurrent")``) for
each backward; segments starting mid-chunk, on a chunk edge, several in one chunk, one-token segments, T not a
multiple of the chunk, grouped heads, an initial state and both dtypes; the UT inverse never couples two
segments."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.delta_rule import gated_delta_rule
from pallas_kernels.gdn import gated_delta_rule_pallas, gdn_blocks
from pallas_kernels.gdn.api import _gdn_forward
from pallas_kernels.ssd.api import segment_runs
from kernel_inputs import jitted_outputs_and_vjp, packed_segment_ids, random_gdn_inputs

CHUNK = 16
NAMES = ("dq", "dk", "dv", "d_log_a", "d_beta", "d_initial")


def random_inputs(seed, batch=2, length=45, groups=2, heads=4, key_dim=16, value_dim=32):
    """``kernel_inputs.random_gdn_inputs`` and random cotangents ``(d_out, d_final)``, float64 numpy."""
    inputs = random_gdn_inputs(seed, batch, length, groups, heads, key_dim, value_dim)
    rng = np.random.default_rng(seed + 1000)
    return inputs, (rng.normal(size=inputs[2].shape), rng.normal(size=inputs[5].shape))


def outputs_and_grads(inputs, cotangents, dtype, segment_ids, backward=None, **block_changes):
    """``((o, final), (dq, dk, dv, d log_a, dβ, d initial))`` for the given cotangents: from the kernels with
    16-token chunks and ``backward`` (``gated_delta_rule_pallas``), or, with ``backward=None``, from
    ``gated_delta_rule(impl="recurrent")`` in ``dtype`` (float64 for the oracle). States are float32 (the op's
    contract)."""
    arrays = [jnp.asarray(x, dtype) for x in inputs[:5]] + [jnp.asarray(inputs[5], jnp.float32)]
    cotangents = (jnp.asarray(cotangents[0], dtype), jnp.asarray(cotangents[1], jnp.float32))
    segments = None if segment_ids is None else jnp.asarray(segment_ids)

    def op(q, k, v, log_a, beta, initial):
        if backward is None:
            return gated_delta_rule(q, k, v, log_a, beta, initial_state=initial, return_final_state=True,
                                    impl="recurrent", segment_ids=segments)
        blocks = dataclasses.replace(gdn_blocks(q.shape[-1], v.shape[-1], CHUNK), backward=backward,
                                     **block_changes)
        return gated_delta_rule_pallas(q, k, v, log_a, beta, initial, segment_ids=segments, blocks=blocks)

    return jitted_outputs_and_vjp(op, arrays, cotangents)


def float64_recurrence(inputs, cotangents, segment_ids):
    with jax.enable_x64(True):
        outputs, grads = outputs_and_grads(inputs, cotangents, jnp.float64, segment_ids)
        return [np.asarray(x) for x in outputs], [np.asarray(g) for g in grads]


def assert_close(actual, expected, tol, name):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, name
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=name)


def assert_matches(outputs, grads, expected_outputs, expected_grads, tol):
    for name, got, want in zip(("out", "final") + NAMES, (*outputs, *grads), (*expected_outputs, *expected_grads)):
        assert_close(got, want, tol, name)


@pytest.mark.parametrize("backward, block_changes", [
    ("kernels", dict(grad_value_block=16)),  # the gradient kernel walks the value dim in two blocks
    ("chunk_vjp", {}),
    ("reference", {}),
])
def test_float32_matches_the_float64_recurrence(backward, block_changes):
    inputs, cotangents = random_inputs(0)
    segment_ids = packed_segment_ids()
    outputs, grads = outputs_and_grads(inputs, cotangents, jnp.float32, segment_ids, backward, **block_changes)
    expected_outputs, expected_grads = float64_recurrence(inputs, cotangents, segment_ids)
    assert outputs[0].dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
    assert_matches(outputs, grads, expected_outputs, expected_grads, 1e-4)


def test_bfloat16_matches_the_float64_recurrence():
    """bf16 operands, float32 accumulation, one group of two heads; the oracle runs on the bf16-rounded inputs."""
    inputs, cotangents = random_inputs(1, batch=2, length=37, groups=1, heads=2)
    segment_ids = packed_segment_ids(37)
    outputs, grads = outputs_and_grads(inputs, cotangents, jnp.bfloat16, segment_ids, "kernels")
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in inputs[:5]] + [inputs[5]]
    rounded_cotangents = (np.asarray(jnp.asarray(cotangents[0], jnp.bfloat16), np.float64), cotangents[1])
    expected_outputs, expected_grads = float64_recurrence(rounded, rounded_cotangents, segment_ids)
    assert outputs[0].dtype == jnp.bfloat16 and outputs[1].dtype == jnp.float32
    assert_matches(outputs, grads, expected_outputs, expected_grads, 1e-2)


def test_the_ut_inverse_and_state_read_stay_inside_segments():
    """``X = (I + L)⁻¹`` is zero between tokens of different segments of a chunk, and the rows of ``W`` after the
    chunk's first segment start are zero (those tokens never read the entering state through ``W S``), while both
    are nonzero inside a segment."""
    inputs, _ = random_inputs(2, batch=2, length=48, groups=1, heads=2)
    segment_ids = packed_segment_ids(48)
    q, k, v, log_a, beta, initial = (jnp.asarray(x, jnp.float32) for x in inputs)
    blocks = gdn_blocks(16, 32, CHUNK)
    _, (_, w, _, _, _, inverse) = _gdn_forward(q, k, v, log_a, beta, initial, blocks, store_inverse=True,
                                               segment_ids=jnp.asarray(segment_ids))
    runs = np.asarray(segment_runs(jnp.asarray(segment_ids), CHUNK)).reshape(2, -1, CHUNK)  # [B, N, C]
    inverse = np.asarray(inverse).reshape(2, -1, CHUNK, 2, CHUNK)  # [B, N, C(row), H, C(col)]
    same_run = runs[:, :, :, None] == runs[:, :, None, :]  # [B, N, C, C]
    causal = np.tril(np.ones((CHUNK, CHUNK), bool))
    across = np.moveaxis(inverse, 3, 2)[np.broadcast_to(~same_run[:, :, None], (2, 3, 2, CHUNK, CHUNK))]
    assert np.all(across == 0.0)
    inside = np.moveaxis(inverse, 3, 2)[np.broadcast_to((same_run & causal)[:, :, None], (2, 3, 2, CHUNK, CHUNK))]
    assert np.all(inside != 0.0)
    w_rows = np.abs(np.asarray(w)).reshape(2, -1, CHUNK, 2, 16).sum(axis=(3, 4))  # [B, N, C]
    assert np.all(w_rows[runs > 0] == 0.0) and np.all(w_rows[runs == 0] > 0.0)


def test_equal_segment_ids_give_the_single_sequence_result():
    inputs, cotangents = random_inputs(3, batch=1, length=37, groups=1, heads=2)
    segmented = outputs_and_grads(inputs, cotangents, jnp.float32, np.full((1, 37), 4, np.int32), "kernels")
    plain = outputs_and_grads(inputs, cotangents, jnp.float32, None, "kernels")
    for name, a, b in zip(("out", "final") + NAMES, (*segmented[0], *segmented[1]), (*plain[0], *plain[1])):
        assert_close(a, b, 1e-5, name)


def test_op_dispatch_passes_segment_ids_to_the_kernels():
    """``gated_delta_rule(impl="pallas")`` equals ``impl="recurrent"`` on packed rows, output and gradients."""
    inputs, _ = random_inputs(4, batch=2, length=45, groups=2, heads=4)
    arrays = [jnp.asarray(x, jnp.float32) for x in inputs]
    segment_ids = jnp.asarray(packed_segment_ids())

    def loss(impl, *arrays):
        out, final = gated_delta_rule(*arrays[:5], initial_state=arrays[5], return_final_state=True, impl=impl,
                                      chunk_size=CHUNK, segment_ids=segment_ids)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(final)), out

    with jax.default_matmul_precision("float32"):
        (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=range(6),
                                                     has_aux=True))(*arrays)
        (_, ref_out), ref_grads = jax.jit(jax.value_and_grad(lambda *a: loss("recurrent", *a), argnums=range(6),
                                                             has_aux=True))(*arrays)
    assert_close(out, ref_out, 1e-4, "out")
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close(got, want, 1e-4, name)


def test_wrong_segment_ids_shape_raises_for_the_kernels():
    inputs, _ = random_inputs(5, batch=2, length=9)
    q, k, v, log_a, beta, initial = (jnp.asarray(x, jnp.float32) for x in inputs)
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]=\(2, 9\), got \(9,\)"):
        gated_delta_rule_pallas(q, k, v, log_a, beta, initial, CHUNK, segment_ids=jnp.zeros((9,), jnp.int32))
