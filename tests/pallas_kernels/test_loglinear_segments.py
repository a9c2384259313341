"""Packed sequences on the log-linear kernels (interpret mode on CPU): the segment row layout against a per-token
loop, and the forward and every gradient of log-linear SSD and log-linear Gated DeltaNet (every backward) against
``impl="recurrent"`` with segment ids: grouped heads, T not a multiple of the chunk, one-token segments, a segment
starting on a chunk edge, a segment spanning six chunks (three chunk levels), bf16, and the chunked fallback
when a row's segments need more rows than the layout has."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import gated_draws, jitted_outputs_and_vjp, packed_segment_ids

from jaxlm.ops.loglinear import loglinear_gated_delta_rule, loglinear_ssd
from pallas_kernels.loglinear import loglinear_blocks, loglinear_ssd_pallas
from pallas_kernels.loglinear.segments import from_rows, row_capacities, rows_needed, segment_rows, to_rows
from pallas_kernels.loglinear_gdn import loglinear_gated_delta_rule_pallas, loglinear_gdn_blocks

CHUNK = 16
LENGTH = 100


def starts_to_ids(length: int, rows: list[list[int]]) -> np.ndarray:
    """``[B, length]`` ids with a new id at every listed start (ids counting up from 0 at token 0)."""
    ids = np.zeros((len(rows), length), np.int32)
    for row, starts in enumerate(rows):
        for start in starts:
            ids[row, start:] += 1
    return ids


# Row 0: [0, 3), [3, 16), [16] (a one-token segment on a chunk edge), [17, 100) (83 tokens: ranks 0 … 5).
# Row 1: [0, 40), [40] (one token), [41, 100). Row 0 needs 9 rows: more than the 8-row layout, within the 14-row one.
SEGMENTS = starts_to_ids(LENGTH, [[3, 16, 17], [40, 41]])


def layout_by_loop(segment_ids: np.ndarray, chunk: int):
    """Per token: (slot, rank) of the row layout, walking the tokens one by one."""
    slots, ranks = np.zeros(segment_ids.shape, int), np.zeros(segment_ids.shape, int)
    for b, ids in enumerate(segment_ids):
        row, position = -1, 0
        for t, segment in enumerate(ids):
            position = 0 if t == 0 or segment != ids[t - 1] else position + 1
            row += position % chunk == 0
            slots[b, t], ranks[b, t] = row * chunk + position % chunk, position // chunk
    return slots, ranks


def test_segment_rows_match_a_per_token_loop():
    assert row_capacities(LENGTH, CHUNK) == (8, 14) and int(rows_needed(jnp.asarray(SEGMENTS), CHUNK)) == 9
    rows = segment_rows(jnp.asarray(SEGMENTS), CHUNK, 14)
    slots, ranks = layout_by_loop(SEGMENTS, CHUNK)
    np.testing.assert_array_equal(np.asarray(rows.slots), slots)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(rows.ranks), slots, axis=1), ranks)
    assert bool(rows.fits) and rows.ranks.shape == (2, 14 * CHUNK)
    assert np.asarray(rows.ranks)[0, ::CHUNK].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, LENGTH, 3)))
    on_rows = to_rows(x, rows)
    np.testing.assert_array_equal(np.asarray(from_rows(on_rows, rows)), np.asarray(x))
    used = np.zeros(on_rows.shape[:2], bool)
    np.put_along_axis(used, slots, True, axis=1)
    np.testing.assert_array_equal(np.asarray(on_rows)[~used], 0.0)  # padding slots hold zeros
    overflowing = packed_segment_ids(45)  # row 0 needs 8 rows of 16, the largest layout has 6
    assert row_capacities(45, CHUNK) == (4, 6) and int(rows_needed(jnp.asarray(overflowing), CHUNK)) == 8
    assert not bool(segment_rows(jnp.asarray(overflowing), CHUNK, 6).fits)


def random_inputs(seed: int, length: int, groups: int = 1, heads: int = 2, dim: int = 16) -> tuple:
    """``(q, k, v, log_a, beta, lam)`` float64 for two packed rows, λ with one extra (ignored) column."""
    rng = np.random.default_rng(seed)
    q, k, v, log_a, beta = gated_draws(rng, 2, length, groups, heads, dim, dim, max_log_decay=0.3)
    lam = rng.uniform(0.2, 1.8, size=(2, length, heads, (length - 1).bit_length() + 2))
    return q, k, v, log_a, beta, lam


def ssd_op(impl_fn, q, k, v, log_a, beta, lam, **kwargs):
    return impl_fn(q, k, v, log_a, lam, **kwargs)


def gdn_op(impl_fn, q, k, v, log_a, beta, lam, **kwargs):
    return impl_fn(q, k, v, log_a, beta, lam, **kwargs)


OPS = {
    "ssd": (functools.partial(ssd_op, loglinear_ssd), functools.partial(ssd_op, loglinear_ssd_pallas),
            lambda backward: dataclasses.replace(loglinear_blocks(16, 16, CHUNK), backward=backward)),
    "gdn": (functools.partial(gdn_op, loglinear_gated_delta_rule),
            functools.partial(gdn_op, loglinear_gated_delta_rule_pallas),
            lambda backward: dataclasses.replace(loglinear_gdn_blocks(16, 16, CHUNK), backward=backward)),
}


def assert_close(actual, expected, tol, name=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=name)


@pytest.mark.parametrize("op, backward, segments", [
    pytest.param("ssd", "kernels", SEGMENTS, id="ssd-kernels"),
    pytest.param("ssd", "reference", SEGMENTS, id="ssd-reference"),
    pytest.param("gdn", "kernels", SEGMENTS, id="gdn-kernels"),
    pytest.param("gdn", "chunk_vjp", SEGMENTS, id="gdn-chunk_vjp"),
    pytest.param("gdn", "kernels", starts_to_ids(LENGTH, [[20], [64]]), id="gdn-kernels-smaller-layout"),
    pytest.param("ssd", "kernels", packed_segment_ids(LENGTH), id="ssd-overflow-fallback"),
])
def test_forward_and_gradients_match_the_recurrent_reference(op, backward, segments):
    """Two query heads per key group. ``SEGMENTS`` run on the 14-row layout, the smaller-layout case on the
    8-row one (7 rows needed); the last case's rows need more rows than either has (three segments in one chunk,
    short segments), so it runs the chunked fallback."""
    reference_op, pallas_op, blocks_of = OPS[op]
    segment_ids = jnp.asarray(segments)
    arrays = [jnp.asarray(x, jnp.float32) for x in random_inputs(LENGTH, LENGTH)]
    d_out = jnp.asarray(np.random.default_rng(1).normal(size=arrays[2].shape), jnp.float32)
    blocks = blocks_of(backward)
    out, grads = jitted_outputs_and_vjp(lambda *x: pallas_op(*x, blocks=blocks, segment_ids=segment_ids), arrays,
                                        d_out)
    expected, expected_grads = jitted_outputs_and_vjp(
        lambda *x: reference_op(*x, impl="recurrent", segment_ids=segment_ids), arrays, d_out)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    assert_close(out, expected, 1e-5, "out")
    names = ("dq", "dk", "dv", "dlog_a", "dbeta", "dlam")
    for name, grad, reference in zip(names, grads, expected_grads):
        if op == "ssd" and name == "dbeta":
            np.testing.assert_array_equal(np.asarray(grad), 0.0)  # SSD ignores β
            continue
        assert grad.shape == reference.shape, name
        assert_close(grad, reference, 1e-4, name)


@pytest.mark.parametrize("op", ["ssd", "gdn"])
def test_bfloat16_inputs_accumulate_in_float32(op):
    reference_op, pallas_op, blocks_of = OPS[op]
    segment_ids = jnp.asarray(SEGMENTS)
    inputs = random_inputs(7, LENGTH)
    rounded = [jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32) for x in inputs]
    out = pallas_op(*(jnp.asarray(x, jnp.bfloat16) for x in inputs), blocks=blocks_of("kernels"),
                    segment_ids=segment_ids)
    with jax.default_matmul_precision("float32"):
        expected = reference_op(*rounded, impl="recurrent", segment_ids=segment_ids)
    assert out.dtype == jnp.bfloat16
    assert_close(out, expected, 1e-2)


def test_ops_with_segment_ids_run_the_kernels():
    segment_ids = jnp.asarray(starts_to_ids(LENGTH, [[50], [30]]))  # fits the layouts of the default 64-token chunks
    assert int(rows_needed(segment_ids, 64)) <= row_capacities(LENGTH, 64)[0]
    q, k, v, log_a, beta, lam = (jnp.asarray(x, jnp.float32) for x in random_inputs(3, LENGTH))
    through_op = loglinear_gated_delta_rule(q, k, v, log_a, beta, lam, impl="pallas", segment_ids=segment_ids)
    direct = loglinear_gated_delta_rule_pallas(q, k, v, log_a, beta, lam, segment_ids=segment_ids)
    np.testing.assert_array_equal(np.asarray(through_op), np.asarray(direct))
    through_op = loglinear_ssd(q, k, v, log_a, lam, impl="pallas", segment_ids=segment_ids)
    np.testing.assert_array_equal(np.asarray(through_op),
                                  np.asarray(loglinear_ssd_pallas(q, k, v, log_a, lam, segment_ids=segment_ids)))
