"""Gated delta rule: recurrent and chunked forms against a float64 numpy recurrence, and against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.delta_rule import gated_delta_rule, gated_delta_rule_step

B, T, G, H, K, V = 2, 37, 2, 4, 8, 6
CHUNK = 16
# Jitted once per shape and static option (eager dispatch of the chunked form is slow on CPU).
run_op = jax.jit(gated_delta_rule, static_argnames=("return_final_state", "impl", "chunk_size"))


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """Float32 tolerances assume float32 matmuls (GPUs would otherwise use TF32 for them)."""
    with jax.default_matmul_precision("float32"):
        yield


def random_inputs(seed=0, batch=B, length=T, groups=G, heads=H, key_dim=K, value_dim=V):
    """Float64 inputs shaped like a GDN layer's: unit-norm keys, β in (0, 1), log_a in (-1, 0)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, groups, key_dim)) / np.sqrt(key_dim)
    k = rng.normal(size=(batch, length, groups, key_dim))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, length, heads, value_dim))
    log_a = -rng.uniform(0.01, 1.0, size=(batch, length, heads))
    beta = rng.uniform(0.05, 1.0, size=(batch, length, heads))
    state = rng.normal(size=(batch, heads, key_dim, value_dim))
    return q, k, v, log_a, beta, state


def np_gated_delta_rule(q, k, v, log_a, beta, state, segment_ids=None):
    """Float64 python recurrence straight from ``S_t = a_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``,
    ``o_t = S_tᵀ q_t``; the state resets where the segment id changes."""
    batch, length, groups, key_dim = q.shape
    heads = v.shape[2]
    out = np.zeros(v.shape)
    state = np.array(state, np.float64)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            S = state[b, h]
            for t in range(length):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    S = np.zeros_like(S)
                kt = k[b, t, g]
                transition = np.exp(log_a[b, t, h]) * (np.eye(key_dim) - beta[b, t, h] * np.outer(kt, kt))
                S = transition @ S + beta[b, t, h] * np.outer(kt, v[b, t, h])
                out[b, t, h] = S.T @ q[b, t, g]
            state[b, h] = S
    return out, state


def np_product_form(q, k, v, log_a, beta):
    """Float64 oracle of REFERENCE §1: ``o_t = Σ_{s≤t} (q_tᵀ A_t … A_{s+1} β_s k_s) v_sᵀ`` with
    ``A_r = a_r (I − β_r k_r k_rᵀ)`` (zero initial state), by explicit matrix products."""
    batch, length, groups, key_dim = q.shape
    heads = v.shape[2]
    out = np.zeros(v.shape)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            for t in range(length):
                product = np.eye(key_dim)  # A_t … A_{s+1}
                for s in range(t, -1, -1):
                    coefficient = q[b, t, g] @ product @ (beta[b, s, h] * k[b, s, g])
                    out[b, t, h] += coefficient * v[b, s, h]
                    ks = k[b, s, g]
                    product = product @ (np.exp(log_a[b, s, h]) * (np.eye(key_dim) - beta[b, s, h] * np.outer(ks, ks)))
    return out


def as_jax(arrays, dtype=jnp.float32):
    return tuple(jnp.asarray(x, dtype) for x in arrays)


def test_recurrence_oracle_equals_product_form():
    q, k, v, log_a, beta, _ = random_inputs(seed=1, batch=1, length=9, groups=1, heads=2, key_dim=4, value_dim=3)
    expected, _ = np_gated_delta_rule(q, k, v, log_a, beta, np.zeros((1, 2, 4, 3)))
    np.testing.assert_allclose(np_product_form(q, k, v, log_a, beta), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl, length", [("recurrent", 37), ("chunked", 37), ("chunked", 70), ("chunked", 5),
                                          ("auto", 5)])
def test_float32_matches_float64_oracle(impl, length):
    q, k, v, log_a, beta, state = random_inputs(seed=length, length=length)
    expected, expected_state = np_gated_delta_rule(q, k, v, log_a, beta, state)
    out, final_state = run_op(*as_jax((q, k, v, log_a, beta)), initial_state=jnp.asarray(state, jnp.float32),
                                        return_final_state=True, impl=impl, chunk_size=CHUNK)
    assert out.dtype == jnp.float32 and out.shape == (B, length, H, V)
    assert final_state.dtype == jnp.float32 and final_state.shape == (B, H, K, V)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final_state), expected_state, rtol=1e-5, atol=1e-5)


def test_chunked_matches_oracle_with_strong_decay_and_large_chunk():
    # Decays down to exp(-8) per step underflow the within-chunk cumulative gate over 64 steps.
    q, k, v, _, beta, state = random_inputs(seed=7, length=70)
    log_a = -np.random.default_rng(8).uniform(0.0, 8.0, size=(B, 70, H))
    expected, expected_state = np_gated_delta_rule(q, k, v, log_a, beta, state)
    out, final_state = run_op(*as_jax((q, k, v, log_a, beta)), initial_state=jnp.asarray(state, jnp.float32),
                                        return_final_state=True, impl="chunked", chunk_size=64)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final_state), expected_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_bfloat16_inputs_match_oracle(impl):
    inputs = random_inputs(seed=3)
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in inputs]  # the values the op sees
    expected, _ = np_gated_delta_rule(*rounded)
    out = run_op(*as_jax(inputs[:5], jnp.bfloat16), initial_state=jnp.asarray(inputs[5], jnp.float32),
                           impl=impl, chunk_size=CHUNK)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-2, atol=2e-2)


def _loss_and_grads(impl, arrays):
    q, k, v, log_a, beta, state = arrays
    weights = jnp.asarray(np.random.default_rng(11).normal(size=(B, T, H, V)), q.dtype)
    weights_state = jnp.asarray(np.random.default_rng(12).normal(size=(B, H, K, V)), q.dtype)

    def loss(q, k, v, log_a, beta, state):
        out, final_state = run_op(q, k, v, log_a, beta, initial_state=state, return_final_state=True,
                                            impl=impl, chunk_size=CHUNK)
        return jnp.sum(out * weights) + jnp.sum(final_state * weights_state)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, k, v, log_a, beta, state)


def test_gradients_chunked_equal_recurrent_and_float64():
    inputs = random_inputs(seed=5)
    chunked = _loss_and_grads("chunked", as_jax(inputs))
    recurrent = _loss_and_grads("recurrent", as_jax(inputs))
    with jax.enable_x64(True):  # the float64 reference gradients
        reference = _loss_and_grads("recurrent", as_jax(inputs, jnp.float64))
    names = ("q", "k", "v", "log_a", "beta", "initial_state")
    for name, fast, slow, exact in zip(names, chunked, recurrent, reference):
        scale = np.abs(np.asarray(exact)).max()
        assert scale > 1e-3, name
        np.testing.assert_allclose(np.asarray(fast), np.asarray(exact), rtol=1e-5, atol=2e-5 * scale, err_msg=name)
        np.testing.assert_allclose(np.asarray(slow), np.asarray(exact), rtol=1e-5, atol=2e-5 * scale, err_msg=name)


def test_two_calls_equal_one(impl="chunked"):
    q, k, v, log_a, beta, state = as_jax(random_inputs(seed=9))
    whole, whole_state = run_op(q, k, v, log_a, beta, initial_state=state, return_final_state=True,
                                          impl=impl, chunk_size=CHUNK)
    split = 23
    first, middle_state = run_op(q[:, :split], k[:, :split], v[:, :split], log_a[:, :split],
                                           beta[:, :split], initial_state=state, return_final_state=True,
                                           impl=impl, chunk_size=CHUNK)
    second, last_state = run_op(q[:, split:], k[:, split:], v[:, split:], log_a[:, split:],
                                          beta[:, split:], initial_state=middle_state, return_final_state=True,
                                          impl=impl, chunk_size=CHUNK)
    np.testing.assert_allclose(np.concatenate([first, second], 1), np.asarray(whole), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(last_state), np.asarray(whole_state), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_segments_equal_separate_sequences(impl):
    q, k, v, log_a, beta, state = random_inputs(seed=13)
    bounds = [(0, 10), (10, 30), (30, T)]  # the boundary at 30 falls inside a chunk, 10 too
    segment_ids = np.zeros((B, T), np.int32)
    for index, (start, end) in enumerate(bounds):
        segment_ids[:, start:end] = index + 1
    out, final_state = run_op(*as_jax((q, k, v, log_a, beta)), initial_state=jnp.asarray(state, jnp.float32),
                                        return_final_state=True, impl=impl, chunk_size=CHUNK,
                                        segment_ids=jnp.asarray(segment_ids))
    for index, (start, end) in enumerate(bounds):
        piece = [x[:, start:end] for x in (q, k, v, log_a, beta)]
        start_state = state if index == 0 else np.zeros_like(state)  # the first segment continues initial_state
        expected, expected_state = np_gated_delta_rule(*piece, start_state)
        np.testing.assert_allclose(np.asarray(out[:, start:end]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final_state), expected_state, rtol=1e-5, atol=1e-5)
    # The oracle's own reset logic agrees with running the pieces separately.
    np.testing.assert_allclose(np.asarray(out), np_gated_delta_rule(q, k, v, log_a, beta, state, segment_ids)[0],
                               rtol=1e-5, atol=1e-5)


def test_zero_beta_is_pure_decay(impl="chunked"):
    # β = 0: nothing is written or erased, S_t = exp(Σ_{r≤t} log_a_r) S_0 and o_t = S_tᵀ q_t.
    q, k, v, log_a, _, state = random_inputs(seed=17)
    out, final_state = run_op(*as_jax((q, k, v, log_a, np.zeros((B, T, H)))),
                                        initial_state=jnp.asarray(state, jnp.float32), return_final_state=True,
                                        impl=impl, chunk_size=CHUNK)
    decay = np.exp(np.cumsum(log_a, axis=1))  # [B, T, H]
    q_heads = np.repeat(q, H // G, axis=2)  # [B, T, H, K]
    expected = decay[..., None] * np.einsum("bthk,bhkv->bthv", q_heads, state)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(final_state), decay[:, -1, :, None, None] * state, rtol=1e-5, atol=1e-6)


def test_steps_equal_parallel_form():
    q, k, v, log_a, beta, state = as_jax(random_inputs(seed=19))
    parallel, parallel_state = run_op(q, k, v, log_a, beta, initial_state=state, return_final_state=True,
                                                chunk_size=CHUNK)
    step = jax.jit(gated_delta_rule_step)
    outputs = []
    for t in range(T):
        out_t, state = step(state, q[:, t], k[:, t], v[:, t], log_a[:, t], beta[:, t])
        outputs.append(out_t)
    np.testing.assert_allclose(np.stack(outputs, 1), np.asarray(parallel), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state), np.asarray(parallel_state), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(impl="fast"), ValueError, "impl must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive integer"),
    (dict(initial_state=jnp.zeros((B, H, K, V + 1))), ValueError, "initial_state must be"),
    (dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), ValueError, "segment_ids must be"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    q, k, v, log_a, beta, _ = as_jax(random_inputs())
    with pytest.raises(error, match=message):
        gated_delta_rule(q, k, v, log_a, beta, **kwargs)


def test_bad_shapes_raise_clear_errors():
    q, k, v, log_a, beta, _ = as_jax(random_inputs())
    with pytest.raises(ValueError, match="H % G == 0"):
        gated_delta_rule(q, k, v[:, :, :3], log_a[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="q and k must both be"):
        gated_delta_rule(q, k[..., :4], v, log_a, beta)
    with pytest.raises(ValueError, match="beta must be"):
        gated_delta_rule(q, k, v, log_a, beta[:, :, :2])


@pytest.mark.slow
def test_64k_tokens_bfloat16_chunked_stays_finite():
    length = 65536
    rng = np.random.default_rng(23)
    k = rng.normal(size=(1, length, 1, 16))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = rng.normal(size=(1, length, 1, 16)) / 4.0
    v = rng.normal(size=(1, length, 2, 16))
    log_a = -rng.uniform(0.0, 0.1, size=(1, length, 2))
    beta = rng.uniform(0.0, 1.0, size=(1, length, 2))
    run = jax.jit(lambda *args: gated_delta_rule(*args, return_final_state=True, impl="chunked"))
    out, state = run(*as_jax((q, k, v, log_a, beta), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    out, state = np.asarray(out, np.float32), np.asarray(state)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(state))
    assert 0.05 < np.abs(out[:, -1024:]).mean() < 10.0  # a live, bounded output at the end of the sequence
