"""Log-linear Gated DeltaNet kernel backward (interpret mode on CPU): the reverse level-cotangent pass against a
float64 oracle summed over every later output, the per-chunk gradient kernel against the XLA VJP of the per-chunk
map, ``backward="kernels"`` and ``"chunk_vjp"`` against ``"reference"`` and against ``impl="recurrent"`` with λ
short of levels, and clear errors for an unknown backward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.delta_rule_chunked import pad_time
from jaxlm.ops.fenwick import fenwick_level
from jaxlm.ops.loglinear import loglinear_gated_delta_rule
from pallas_kernels.gdn.api import within_chunk_gates
from pallas_kernels.gdn.kernel_ut import ut_transform
from pallas_kernels.loglinear_gdn import loglinear_gated_delta_rule_pallas, loglinear_gdn_blocks
from pallas_kernels.loglinear_gdn.api import _forward
from pallas_kernels.loglinear_gdn.backward import chunk_levels, chunk_map, head_chunks, time_major
from pallas_kernels.loglinear_gdn.kernel_bwd import level_cotangents
from pallas_kernels.loglinear_gdn.kernel_chunk_bwd import chunk_grads
from pallas_kernels.loglinear_gdn.level_inputs import level_rows
from kernel_inputs import random_loglinear_gdn_inputs

CHUNK = 16
NAMES = ("dq", "dk", "dv", "dlog_a", "dbeta", "dlam")


def random_inputs(seed, length, groups, heads, levels, key_dim=16, value_dim=32):
    """``(q, k, v, log_a, beta, lam)`` float64 for one sequence, unit-norm keys, ``lam`` with ``levels`` columns."""
    return random_loglinear_gdn_inputs(seed, length, groups, heads, levels, key_dim, value_dim, max_log_decay=0.3)


def assert_close(actual, expected, tol, name=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=name)


def float64_cotangent(q, k, log_a, beta, lam, d_out, source_chunk, after_chunk):
    """``∂⟨dO, O⟩/∂Z`` for a ``[K, V]`` state ``Z`` holding keys of chunk ``source_chunk`` carried to the end of chunk
    ``after_chunk``: ``Σ_{t after it} λ_t^{level(t, s)} (A_t … A_first)ᵀ q_t dO_tᵀ`` (``s`` any key of the source
    chunk, every one has the same level for these t), by the recurrence ``Φ ← a_t (I − β_t k_t k_tᵀ) Φ``.
    ``q, k [T, K]``, ``log_a, beta [T]``, ``lam [T, L]`` (missing levels weigh 0), ``d_out [T, V]``."""
    key_dim = q.shape[1]
    carry = np.eye(key_dim)  # Φ = A_t … A_first  [K, K]
    total = np.zeros((key_dim, d_out.shape[1]))
    for t in range((after_chunk + 1) * CHUNK, q.shape[0]):
        carry = np.exp(log_a[t]) * (carry - beta[t] * np.outer(k[t], k[t] @ carry))
        level = int(fenwick_level(jnp.int32(t), jnp.int32(source_chunk * CHUNK)))
        if level < lam.shape[1]:
            total += lam[t, level] * np.outer(carry.T @ q[t], d_out[t])
    return total


def test_level_cotangents_match_a_float64_sum_over_later_outputs():
    """11 chunks of 16 (T = 171: the last chunk padded), four chunk levels, λ one column short of the levels, two
    value blocks. ``E^{(j)}_n`` is the cotangent of level j carried through chunk n: it holds chunk n itself
    (j < lssb(n + 1): merged at the boundary), nothing (j = lssb(n + 1)), or the chunks ending at
    ``n_j = (n >> j) << j`` (j above, bit j of n set); ``dX_n`` is chunk n's writes'."""
    length, num_chunks, levels = 171, 11, 4
    q, k, v, log_a, beta, lam = random_inputs(3, length, 1, 1, levels=8)
    d_out = np.random.default_rng(4).normal(size=v.shape)
    padding = -length % CHUNK
    k_p, v_p, beta_p, d_out_p = (pad_time(jnp.asarray(x, jnp.float32), padding) for x in (k, v, beta, d_out))
    cum = within_chunk_gates(jnp.asarray(log_a, jnp.float32), CHUNK, padding)  # [B, T', H]
    with jax.default_matmul_precision("float32"):  # XLA:GPU would otherwise take TF32 for chunk_map's Q̂
        w, _, decayed_keys = ut_transform(k_p, v_p, beta_p, cum, chunk=CHUNK, sub_block=16)
        queries = time_major(chunk_map(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, log_a, beta, lam)),
                                       CHUNK)[1])
        carried, writes = level_cotangents(queries, d_out_p, w, decayed_keys, cum,
                                           level_rows(jnp.asarray(lam), padding, CHUNK.bit_length() + levels),
                                           chunk=CHUNK, in_chunk_levels=CHUNK.bit_length(), value_block=16,
                                           cotangent_dtype=jnp.float32)
    assert carried.shape == (1, 1, num_chunks, levels, 16, 32) and writes.shape == (1, 1, num_chunks, 16, 32)
    series = (q[0, :, 0], k[0, :, 0], log_a[0, :, 0], beta[0, :, 0], lam[0, :, 0], d_out[0, :, 0])
    for n in range(num_chunks):
        merged = ((n + 1) & -(n + 1)).bit_length() - 1  # lssb(n + 1)
        for level in range(levels):
            if level < merged:
                source = n
            elif level > merged and n >> level & 1:
                source = ((n >> level) << level) - 1
            else:
                np.testing.assert_array_equal(carried[0, 0, n, level], 0.0)
                continue
            assert_close(carried[0, 0, n, level], float64_cotangent(*series, source, n), 2e-5, f"E[{n}, {level}]")
        assert_close(writes[0, 0, n], float64_cotangent(*series, n, n), 2e-5, f"dX[{n}]")


def test_chunk_grads_match_the_vjp_of_the_per_chunk_map():
    """Same saved forward quantities, arbitrary cotangents of ``(O_loc, Q̂, M_n, X_n)``: the kernel equals the XLA
    VJP of ``chunk_map`` (T = 40: three chunks, the last padded; two heads)."""
    length, heads = 40, 2
    inputs = random_inputs(5, length, 1, heads, levels=8)
    arrays = [jnp.asarray(x, jnp.float32) for x in inputs]
    blocks = loglinear_gdn_blocks(16, 32, CHUNK)
    padding, num_chunks = -length % CHUNK, 3
    in_chunk, cross = chunk_levels(length, CHUNK)
    rng = np.random.default_rng(6)
    d_out = jnp.asarray(rng.normal(size=(1, length, heads, 32)), jnp.float32)
    d_queries = jnp.asarray(rng.normal(size=(1, length + padding, heads, 16)), jnp.float32)
    d_transitions = jnp.asarray(rng.normal(size=(1, heads, num_chunks, 16, 16)), jnp.float32)
    d_writes = jnp.asarray(rng.normal(size=(1, heads, num_chunks, 16, 32)), jnp.float32)

    @jax.jit
    def kernel_and_oracle(arrays):
        q, k, v, log_a, beta, lam = arrays
        saved = _forward(*arrays, None, blocks, None, None, for_backward=True)[1]
        lam_rows, rows_vjp = jax.vjp(lambda lam: level_rows(lam, padding, in_chunk + cross), lam)
        *kernel, d_lam_rows = chunk_grads(
            *(pad_time(x, padding) for x in (q, k, v, d_out)), saved.w, saved.inverse, saved.beta, saved.cum,
            lam_rows, d_queries, d_transitions, d_writes, chunk=CHUNK, in_chunk_levels=in_chunk)
        kernel = [x[:, :length] for x in kernel] + list(rows_vjp(d_lam_rows))
        _, vjp = jax.vjp(lambda *x: chunk_map(*x, chunk=CHUNK), *arrays)
        return kernel, vjp((d_out, head_chunks(d_queries, CHUNK), d_transitions, d_writes))

    with jax.default_matmul_precision("float32"):
        kernel, oracle = kernel_and_oracle(arrays)
    dq, dk = (x.sum(axis=2, keepdims=True) for x in kernel[:2])  # per head -> the one group
    kernel = [dq, dk, kernel[2], kernel[4], kernel[3], kernel[5]]  # (dq, dk, dv, d log_a, dβ, dλ)
    for name, grad, expected in zip(NAMES, kernel, oracle):
        assert grad.shape == expected.shape, name
        assert_close(grad, expected, 1e-4, name)


@jax.jit
def backward_grads(arrays, d_out):
    """Gradients of ``<o, dO>`` through the kernels with each ``backward``."""
    blocks = loglinear_gdn_blocks(arrays[0].shape[-1], arrays[2].shape[-1], CHUNK)
    grads = {}
    for backward in ("kernels", "chunk_vjp", "reference"):
        chosen = dataclasses.replace(blocks, backward=backward, transition_key_block=16)
        _, vjp = jax.vjp(lambda *x: loglinear_gated_delta_rule_pallas(*x, blocks=chosen), *arrays)
        grads[backward] = vjp(d_out)
    return grads


def test_kernel_backwards_match_the_reference_backward():
    """T = 87 (6 chunks, the last padded), two heads per group, K = 32 (``P_n`` in two blocks of 16 rows)."""
    inputs = random_inputs(11, 87, 1, 2, levels=9, key_dim=32)
    arrays = [jnp.asarray(x, jnp.float32) for x in inputs]
    d_out = jnp.asarray(np.random.default_rng(12).normal(size=inputs[2].shape), jnp.float32)
    grads = backward_grads(arrays, d_out)
    for backward in ("kernels", "chunk_vjp"):
        for name, grad, expected in zip(NAMES, grads[backward], grads["reference"]):
            assert grad.shape == expected.shape and grad.dtype == expected.dtype, name
            assert_close(grad, expected, 1e-4, f"{backward} {name}")


def test_lam_short_of_levels_matches_the_recurrent_reference():
    """λ with two columns fewer than the levels: the missing levels weigh 0 (the reference gets zero columns), and
    every gradient matches ``impl="recurrent"``. T = 53 (4 chunks)."""
    inputs = random_inputs(21, 53, 1, 1, levels=5)  # num_levels(53) = 7
    arrays = [jnp.asarray(x, jnp.float32) for x in inputs]
    d_out = jnp.asarray(np.random.default_rng(22).normal(size=inputs[2].shape), jnp.float32)
    grads = jax.jit(lambda arrays, d_out: jax.vjp(
        lambda *x: loglinear_gated_delta_rule_pallas(*x, CHUNK), *arrays)[1](d_out))(arrays, d_out)
    padded_lam = jnp.pad(arrays[5], ((0, 0), (0, 0), (0, 0), (0, 2)))
    with jax.default_matmul_precision("float32"):
        _, vjp = jax.vjp(lambda *x: loglinear_gated_delta_rule(*x, impl="recurrent"), *arrays[:5], padded_lam)
        expected = vjp(d_out)
    for name, grad, reference in zip(NAMES, grads, expected[:5] + (expected[5][..., :5],)):
        assert grad.shape == reference.shape, name
        assert_close(grad, reference, 1e-4, name)


def test_unknown_backward_raises_a_clear_error():
    arrays = [jnp.asarray(x, jnp.float32) for x in random_inputs(0, 20, 1, 1, levels=6)]
    blocks = dataclasses.replace(loglinear_gdn_blocks(16, 32, CHUNK), backward="xla")
    with pytest.raises(ValueError, match=r"backward='xla' must be one of \('kernels', 'chunk_vjp', 'reference'\)"):
        loglinear_gated_delta_rule_pallas(*arrays, blocks=blocks)
    blocks = dataclasses.replace(loglinear_gdn_blocks(16, 32, CHUNK), grad_float32_dots="tf32")
    with pytest.raises(ValueError, match=r"grad_float32_dots='tf32' must be one of \('ieee', 'tf32x3'\)"):
        loglinear_gated_delta_rule_pallas(*arrays, blocks=blocks)
