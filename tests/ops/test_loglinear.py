"""Log-linear SSD / Gated DeltaNet: float64 oracle == recurrent == chunked == decode steps.

The oracle materialises every (t, s) coefficient ``q_tᵀ A_t … A_{s+1} β_s k_s`` with a python loop over time
(carrying ``X_t = A_t X_{t-1} + β_t k_t e_tᵀ``, a K×T matrix whose column s is ``A_t … A_{s+1} β_s k_s``),
weights it by ``λ_t^{level}`` with levels from python's ``int.bit_length`` and masks other segments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.fenwick import fenwick_level, lowest_set_bit, num_levels
from jaxlm.ops.loglinear import (
    init_level_stack,
    loglinear_gated_delta_rule,
    loglinear_gated_delta_rule_step,
    loglinear_prefill,
    loglinear_ssd,
    loglinear_ssd_step,
)

# ----------------------------------------------------------------------------------------------- oracle


def oracle_positions(segment_ids, batch, length):
    """Position of each token inside its segment (python loop)."""
    positions = np.zeros((batch, length), np.int64)
    for b in range(batch):
        for t in range(1, length):
            same = segment_ids is not None and segment_ids[b, t] == segment_ids[b, t - 1]
            positions[b, t] = positions[b, t - 1] + 1 if (segment_ids is None or same) else 0
    return positions


def oracle_level_weights(lam, segment_ids, xp):
    """``[B, H, T, S]``: ``λ_t^{level(p_t, p_s)}`` for ``s <= t`` in one segment, 0 otherwise."""
    batch, length, heads, _ = lam.shape
    positions = oracle_positions(segment_ids, batch, length)
    selector = np.zeros((batch, length, length, lam.shape[-1]))
    for b in range(batch):
        for t in range(length):
            for s in range(t + 1):
                if segment_ids is None or segment_ids[b, t] == segment_ids[b, s]:
                    selector[b, t, s, int(positions[b, t] ^ positions[b, s]).bit_length()] = 1.0
    return xp.einsum("bthl,btsl->bhts", lam, xp.asarray(selector))


def oracle(q, k, v, log_a, beta, lam, segment_ids=None, xp=np):
    """Materialised float64 log-linear op; ``beta is None`` means SSD (A = a I, β = 1). Works with np or jnp."""
    batch, length, groups, key_dim = q.shape
    heads = v.shape[2]
    q, k = (xp.repeat(x, heads // groups, axis=2) for x in (q, k))
    keys_through = xp.zeros((batch, heads, key_dim, length))  # X_t [B, H, K, T]
    rows = []
    for t in range(length):
        a = xp.exp(log_a[:, t])[..., None, None]  # [B, H, 1, 1]
        k_t = k[:, t][..., None]  # [B, H, K, 1]
        if beta is None:
            keys_through = a * keys_through
            write = k_t
        else:
            b_t = beta[:, t][..., None, None]
            keys_through = a * (keys_through - b_t * k_t * xp.sum(k_t * keys_through, axis=2, keepdims=True))
            write = b_t * k_t
        keys_through = keys_through + write * xp.asarray(np.eye(length)[t])
        rows.append(xp.einsum("bhk,bhks->bhs", q[:, t], keys_through))
    coefficients = xp.stack(rows, axis=2)  # [B, H, T, S]
    weights = coefficients * oracle_level_weights(lam, segment_ids, xp)
    return xp.einsum("bhts,bshv->bthv", weights, v)


def base_oracle(q, k, v, log_a, beta):
    """The base (not log-linear) recurrence ``S_t = A_t S_{t-1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t``."""
    batch, length, groups, key_dim = q.shape
    heads = v.shape[2]
    q, k = (np.repeat(x, heads // groups, axis=2) for x in (q, k))
    state = np.zeros((batch, heads, key_dim, v.shape[-1]))
    out = np.zeros(v.shape)
    for t in range(length):
        a = np.exp(log_a[:, t])[..., None, None]
        b_t = np.ones_like(log_a[:, t]) if beta is None else beta[:, t]
        k_t = k[:, t]
        if beta is not None:
            state = state - b_t[..., None, None] * k_t[..., None] * np.einsum("bhk,bhkv->bhv", k_t, state)[:, :, None]
        state = a * state + (b_t[..., None] * k_t)[..., None] * v[:, t][:, :, None]
        out[:, t] = np.einsum("bhkv,bhk->bhv", state, q[:, t])
    return out


def random_inputs(seed, batch=2, length=37, groups=1, heads=2, key_dim=4, value_dim=3, extra_levels=1):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, groups, key_dim)) / np.sqrt(key_dim)
    k = rng.normal(size=(batch, length, groups, key_dim))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, length, heads, value_dim))
    log_a = -rng.uniform(0.01, 0.4, size=(batch, length, heads))
    beta = rng.uniform(0.1, 0.95, size=(batch, length, heads))
    lam = rng.uniform(0.3, 1.7, size=(batch, length, heads, num_levels(length) + extra_levels))
    return q, k, v, log_a, beta, lam


def run_op(kind, inputs, dtype=jnp.float32, segment_ids=None, **options):
    q, k, v, log_a, beta, lam = (jnp.asarray(x, dtype) for x in inputs)
    if kind == "ssd":
        op = jax.jit(lambda q, k, v, log_a, beta, lam, seg: loglinear_ssd(q, k, v, log_a, lam, segment_ids=seg,
                                                                          **options))
    else:
        op = jax.jit(lambda q, k, v, log_a, beta, lam, seg: loglinear_gated_delta_rule(
            q, k, v, log_a, beta, lam, segment_ids=seg, **options))
    return op(q, k, v, log_a, beta, lam, segment_ids)


def run_oracle(kind, inputs, segment_ids=None):
    q, k, v, log_a, beta, lam = inputs
    return oracle(q, k, v, log_a, None if kind == "ssd" else beta, lam, segment_ids)


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------------------------- levels


def bucket_levels(t, size):
    """Greedy Fenwick decomposition of the prefix of ``t``: strip set bits of t from the lowest up;
    the bit b removed covers the ``2^b`` keys just below what remains (level ``b + 1``)."""
    levels = np.full(size, -1, np.int64)
    levels[t] = 0
    remaining = t
    for b in range(t.bit_length()):
        if t >> b & 1:
            levels[remaining - (1 << b):remaining] = b + 1
            remaining -= 1 << b
    return levels[: t + 1]


def test_level_matches_bucket_definition_below_2_16():
    rng = np.random.default_rng(0)
    small = np.arange(512)
    got = np.asarray(fenwick_level(jnp.asarray(small)[:, None], jnp.asarray(small)[None, :]))
    for t in small:
        np.testing.assert_array_equal(got[t, : t + 1], bucket_levels(int(t), t + 1), err_msg=f"t={t}")
    large = np.concatenate([rng.integers(512, 1 << 16, 60), [32767, 32768, 65534, 65535, 65536]])
    keys = np.arange((1 << 16) + 1)
    got = np.asarray(fenwick_level(jnp.asarray(large)[:, None], jnp.asarray(keys)[None, :]))
    for row, t in zip(got, large):
        np.testing.assert_array_equal(row[: t + 1], bucket_levels(int(t), int(t) + 1), err_msg=f"t={t}")


def test_level_has_no_overflow_and_lowest_set_bit():
    t = jnp.asarray([65535, 65536, 2**31 - 1, 2**31 - 1, 5], jnp.int32)
    s = jnp.asarray([0, 65535, 0, 2**31 - 2, 5], jnp.int32)
    np.testing.assert_array_equal(np.asarray(fenwick_level(t, s)), [16, 17, 31, 1, 0])
    np.testing.assert_array_equal(np.asarray(lowest_set_bit(jnp.asarray([1, 2, 12, 65536, 2**30]))), [0, 1, 2, 16, 30])
    assert [num_levels(n) for n in (1, 2, 3, 16, 17, 16384, 65536)] == [1, 2, 3, 5, 6, 15, 17]


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
@pytest.mark.parametrize("impl,length,chunk,groups,heads", [
    ("recurrent", 37, 8, 1, 2),
    ("chunked", 37, 8, 1, 2),
    ("chunked", 70, 16, 2, 4),
    ("chunked", 64, 8, 1, 1),
])
def test_matches_float64_oracle(kind, impl, length, chunk, groups, heads):
    inputs = random_inputs(length + heads, length=length, groups=groups, heads=heads)
    out = run_op(kind, inputs, impl=impl, chunk_size=chunk)
    assert_close(out, run_oracle(kind, inputs), 1e-5)


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
def test_large_power_of_two_length_chunked_equals_recurrent(kind):
    inputs = random_inputs(5, batch=1, length=256, heads=1, key_dim=4, value_dim=2)
    chunked = run_op(kind, inputs, impl="chunked", chunk_size=8)
    recurrent = run_op(kind, inputs, impl="recurrent")
    assert_close(chunked, recurrent, 1e-5)


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
def test_unit_lambda_is_the_base_op(kind):
    q, k, v, log_a, beta, lam = random_inputs(7, length=45, groups=1, heads=2)
    inputs = (q, k, v, log_a, beta, np.ones_like(lam))
    expected = base_oracle(q, k, v, log_a, None if kind == "ssd" else beta)
    assert_close(run_op(kind, inputs, impl="chunked", chunk_size=16), expected, 1e-5)
    assert_close(run_oracle(kind, inputs), expected, 1e-12)


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
def test_unit_lambda_matches_jaxlm_base_op(kind):
    module = pytest.importorskip("jaxlm.ops.ssd" if kind == "ssd" else "jaxlm.ops.delta_rule")
    q, k, v, log_a, beta, lam = random_inputs(8, length=37, groups=1, heads=2)
    arrays = [jnp.asarray(x, jnp.float32) for x in (q, k, v, log_a, beta)]
    if kind == "ssd":
        base = module.ssd(*arrays[:4], chunk_size=16)
    else:
        base = module.gated_delta_rule(*arrays, chunk_size=16)
    assert_close(run_op(kind, (q, k, v, log_a, beta, np.ones_like(lam)), chunk_size=16), base, 1e-5)


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_segment_ids_restart_positions(kind, impl):
    inputs = random_inputs(11, length=37, groups=1, heads=2)
    segment_ids = np.array([[1] * 5 + [2] * 19 + [3] * 13, [4] * 30 + [0] * 7])
    out = run_op(kind, inputs, impl=impl, chunk_size=8, segment_ids=jnp.asarray(segment_ids))
    expected = run_oracle(kind, inputs, segment_ids)
    assert_close(out, expected, 1e-5)
    # the second segment of row 0 restarts at position 0: its outputs equal the op run on it alone
    alone = run_oracle(kind, tuple(x[:1, 5:24] for x in inputs))
    assert_close(np.asarray(out)[:1, 5:24], alone, 1e-5)


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
def test_bfloat16_inputs(kind):
    inputs = random_inputs(13, length=70, groups=2, heads=4)
    out = run_op(kind, inputs, dtype=jnp.bfloat16, chunk_size=16)
    assert out.dtype == jnp.bfloat16
    rounded = tuple(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in inputs)
    assert_close(out, run_oracle(kind, rounded), 2e-2)


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
def test_gradients_match_oracle(kind):
    inputs = random_inputs(17, batch=1, length=13, groups=1, heads=2, key_dim=3, value_dim=2)
    projection = np.random.default_rng(1).normal(size=(1, 13, 2, 2))
    beta_index = [4] if kind == "gdn" else []
    argnums = (0, 1, 2, 3, 5, *beta_index)

    def loss(fn, dtype):
        def apply(q, k, v, log_a, beta, lam):
            return jnp.sum(fn(q, k, v, log_a, beta, lam) * jnp.asarray(projection, dtype))
        return jax.grad(apply, argnums=argnums)

    with jax.enable_x64(True):  # float64 reference gradients
        def reference(q, k, v, a, b, lam):
            return oracle(q, k, v, a, None if kind == "ssd" else b, lam, xp=jnp)

        expected = jax.jit(loss(reference, jnp.float64))(*(jnp.asarray(x, jnp.float64) for x in inputs))
        expected = [np.asarray(g) for g in expected]
    for impl in ("recurrent", "chunked"):
        def op(q, k, v, a, b, lam, impl=impl):
            if kind == "ssd":
                return loglinear_ssd(q, k, v, a, lam, impl=impl, chunk_size=4)
            return loglinear_gated_delta_rule(q, k, v, a, b, lam, impl=impl, chunk_size=4)
        got = jax.jit(loss(op, jnp.float32))(*(jnp.asarray(x, jnp.float32) for x in inputs))
        for name, g, e in zip(("q", "k", "v", "log_a", "lam", "beta"), got, expected):
            assert np.max(np.abs(e)) > 1e-3, name
            np.testing.assert_allclose(np.asarray(g), e, rtol=1e-4, atol=1e-4 * np.max(np.abs(e)),
                                       err_msg=f"{impl} d{name}")


# ----------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
def test_decode_steps_equal_oracle(kind):
    length = 37
    q, k, v, log_a, beta, lam = random_inputs(19, length=length, groups=1, heads=2)
    levels = init_level_stack(2, 2, num_levels(length), 4, 3)
    step = jax.jit(loglinear_ssd_step if kind == "ssd" else loglinear_gated_delta_rule_step)
    outs = []
    for t in range(length):
        args = [jnp.asarray(x[:, t], jnp.float32) for x in (q, k, v, log_a)]
        extra = [] if kind == "ssd" else [jnp.asarray(beta[:, t], jnp.float32)]
        o_t, levels = step(levels, jnp.full((2,), t, jnp.int32), *args, *extra, jnp.asarray(lam[:, t], jnp.float32))
        outs.append(o_t)
    assert_close(jnp.stack(outs, axis=1), run_oracle(kind, (q, k, v, log_a, beta, lam)), 1e-5)


def test_decode_rows_at_different_positions():
    """A per-row step counter: row 1 starts 5 tokens later and equals the op on its own tokens."""
    q, k, v, log_a, beta, lam = random_inputs(23, batch=2, length=20, groups=1, heads=2)
    levels = init_level_stack(2, 2, num_levels(20), 4, 3)
    outs = []
    for i in range(20):
        t = jnp.asarray([i, max(i - 5, 0)], jnp.int32)
        args = [jnp.asarray(x[:, i], jnp.float32) for x in (q, k, v, log_a, beta, lam)]
        o_t, levels = loglinear_gated_delta_rule_step(levels, t, *args)
        outs.append(o_t)
    out = np.asarray(jnp.stack(outs, axis=1))
    assert_close(out[1:, 5:], oracle(*(x[1:, 5:] for x in (q, k, v, log_a, beta, lam))), 1e-5)
    assert_close(out[:1], oracle(*(x[:1] for x in (q, k, v, log_a, beta, lam))), 1e-5)


@pytest.mark.parametrize("kind", ["ssd", "gdn"])
@pytest.mark.parametrize("stack_levels", [7, 8, 4])  # 7 = num_levels(37); 4 clamps (a scan, like decode)
def test_chunked_prompt_prefill_equals_decode_steps(kind, stack_levels):
    """A fresh right-padded prefill (the chunked path) leaves the same outputs and level stack as the decode
    step applied to each row's real tokens one by one, then continues identically."""
    length, lengths = 37, [37, 20, 1]
    q, k, v, log_a, beta, lam = (jnp.asarray(x, jnp.float32)
                                 for x in random_inputs(29, batch=3, length=length, groups=1, heads=2))
    beta = None if kind == "ssd" else beta
    real = jnp.asarray(np.arange(length)[None] < np.array(lengths)[:, None])  # [3, T]
    empty = init_level_stack(3, 2, stack_levels, 4, 3)
    out, levels, steps = jax.jit(loglinear_prefill, static_argnames="chunk_size")(
        empty, jnp.zeros(3, jnp.int32), q, k, v, log_a, beta, lam, real, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(steps), lengths)
    step = jax.jit(loglinear_ssd_step if kind == "ssd" else loglinear_gated_delta_rule_step)
    for row, row_length in enumerate(lengths):
        stack = empty[row:row + 1]
        for t in range(row_length):
            args = [x[row:row + 1, t] for x in (q, k, v, log_a) + (() if beta is None else (beta,))]
            o_t, stack = step(stack, jnp.full((1,), t, jnp.int32), *args, lam[row:row + 1, t])
            assert_close(out[row, t], o_t[0], 1e-5)
        assert_close(levels[row], stack[0], 1e-5)


def test_continued_prefill_uses_the_existing_stack():
    """A second prefill on a non-empty stack (the scanned path) continues it exactly."""
    q, k, v, log_a, beta, lam = (jnp.asarray(x, jnp.float32) for x in random_inputs(31, length=21, heads=2))
    empty = init_level_stack(2, 2, num_levels(21), 4, 3)
    full, full_levels, _ = loglinear_prefill(empty, jnp.zeros(2, jnp.int32), q, k, v, log_a, beta, lam)
    first, levels, steps = loglinear_prefill(empty, jnp.zeros(2, jnp.int32), *(x[:, :13] for x in (q, k, v, log_a,
                                             beta, lam)))
    second, levels, steps = loglinear_prefill(levels, steps, *(x[:, 13:] for x in (q, k, v, log_a, beta, lam)))
    assert_close(jnp.concatenate([first, second], axis=1), full, 1e-5)
    assert_close(levels, full_levels, 1e-5)
    np.testing.assert_array_equal(np.asarray(steps), [21, 21])


# ----------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    q, k, v, log_a, beta, lam = (jnp.asarray(x, jnp.float32) for x in random_inputs(0, length=17, extra_levels=0))
    with pytest.raises(ValueError, match=r"L >= num_levels\(T=17\) = 6"):
        loglinear_ssd(q, k, v, log_a, lam[..., :5])
    with pytest.raises(ValueError, match="power of two"):
        loglinear_ssd(q, k, v, log_a, lam, chunk_size=24)
    with pytest.raises(ValueError, match="loglinear_gated_delta_rule pallas kernel: key_dim=4 must be a power of two"):
        loglinear_gated_delta_rule(q, k, v, log_a, beta, lam, impl="pallas")
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        loglinear_ssd(q, k, v, log_a, lam, impl="fast")
    with pytest.raises(ValueError, match="beta must be"):
        loglinear_gated_delta_rule(q, k, v, log_a, beta[..., :1], lam)
    auto = loglinear_ssd(q, k, v, log_a, lam, impl="auto", chunk_size=8)
    assert_close(auto, loglinear_ssd(q, k, v, log_a, lam, impl="chunked", chunk_size=8), 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ssd", "gdn"])
def test_64k_tokens_bfloat16_is_finite(kind):
    length = 1 << 16
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, length, 1, 8)) / 3, jnp.bfloat16) for _ in range(2))
    k = k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True).astype(jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(1, length, 1, 8)), jnp.bfloat16)
    log_a = jnp.asarray(-rng.uniform(0.0, 0.2, size=(1, length, 1)), jnp.bfloat16)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, size=(1, length, 1)), jnp.bfloat16)
    lam = jnp.asarray(rng.uniform(0.5, 1.5, size=(1, length, 1, num_levels(length))), jnp.bfloat16)
    if kind == "ssd":
        out = jax.jit(loglinear_ssd)(q, k, v, log_a, lam)
    else:
        out = jax.jit(loglinear_gated_delta_rule)(q, k, v, log_a, beta, lam)
    assert out.shape == (1, length, 1, 8) and out.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert float(jnp.std(out.astype(jnp.float32))) > 1e-2
