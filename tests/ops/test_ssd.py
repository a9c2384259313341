"""SSD (Mamba-2) op: recurrent and chunked forms against a float64 materialised oracle, gradients, state
passing, packed segments, the decode step, input errors and a long bf16 sequence."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ssd_module = importlib.import_module("jaxlm.ops.ssd")  # the module (jaxlm.ops.ssd is also the function)

IMPLS = ("recurrent", "chunked")


# Compiled once per shape: eager dispatch of the many small ops is much slower on CPU.
ssd = jax.jit(ssd_module.ssd, static_argnames=("return_final_state", "impl", "chunk_size"))
ssd_step = jax.jit(ssd_module.ssd_step)


def _random_inputs(seed, batch_size=2, length=37, num_groups=2, num_heads=4, key_dim=5, value_dim=3):
    """Random float64 ``q, k [B, T, G, K]``, ``v [B, T, H, V]``, ``log_a [B, T, H] < 0``, ``S0 [B, H, K, V]``."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch_size, length, num_groups, key_dim))
    k = rng.standard_normal((batch_size, length, num_groups, key_dim)) / np.sqrt(key_dim)
    v = rng.standard_normal((batch_size, length, num_heads, value_dim))
    log_a = -rng.uniform(0.02, 0.8, (batch_size, length, num_heads))
    initial_state = rng.standard_normal((batch_size, num_heads, key_dim, value_dim))
    return q, k, v, log_a, initial_state


def _oracle(q, k, v, log_a, initial_state, segment_ids=None):
    """Float64 materialised form: ``o_t = Σ_{s≤t, same segment} exp(Σ_{r=s+1..t} log_a_r)(q_t·k_s) v_s
    + [t in token 0's segment] exp(Σ_{r≤t} log_a_r) S0ᵀ q_t``; also the final state."""
    batch_size, length, num_groups, _ = q.shape
    num_heads = v.shape[2]
    heads_per_group = num_heads // num_groups
    if segment_ids is None:
        segment_ids = np.ones((batch_size, length), np.int64)
    segment_index = np.concatenate(  # [B, T] running count of segment starts
        [np.zeros((batch_size, 1), np.int64), np.cumsum(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)], axis=1)
    cum = np.cumsum(log_a, axis=1)  # [B, T, H]
    group_of_head = np.arange(num_heads) // heads_per_group
    q_h, k_h = q[:, :, group_of_head], k[:, :, group_of_head]  # [B, T, H, K]
    causal = np.tril(np.ones((length, length), bool))
    same = segment_index[:, :, None] == segment_index[:, None, :]  # [B, T, T]
    gap = cum.transpose(0, 2, 1)[:, :, :, None] - cum.transpose(0, 2, 1)[:, :, None, :]  # [B, H, T, T]
    mask = np.where((causal & same)[:, None], np.exp(np.where(causal, gap, 0.0)), 0.0)
    scores = np.einsum("bthk,bshk->bhts", q_h, k_h) * mask
    out = np.einsum("bhts,bshv->bthv", scores, v)
    from_start = (segment_index == 0)[:, :, None] * np.exp(cum)  # [B, T, H]
    out += np.einsum("bthk,bhkv->bthv", q_h, initial_state) * from_start[..., None]
    last = segment_index == segment_index[:, -1:]  # [B, T] tokens in the last segment
    write_decay = np.exp(cum[:, -1:] - cum) * last[..., None]  # [B, T, H]
    final = np.einsum("bshk,bsh,bshv->bhkv", k_h, write_decay, v)
    final += initial_state * (np.exp(cum[:, -1]) * (segment_index[:, -1] == 0)[:, None])[..., None, None]
    return out, final


def _ssd_with_state(q, k, v, log_a, initial_state, **options):
    """``ssd(..., initial_state=initial_state, return_final_state=True, chunk_size=16, **options)``."""
    return ssd(q, k, v, log_a, initial_state=initial_state, return_final_state=True, chunk_size=16, **options)


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def _assert_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("impl, length", [("recurrent", 37), ("chunked", 37), ("chunked", 32), ("auto", 5)])
def test_matches_float64_oracle_with_initial_and_final_state(impl, length):
    # 37 and 5: T not a multiple of the chunk (5: shorter than one chunk); "auto" runs the chunked form.
    q, k, v, log_a, initial_state = _random_inputs(length, length=length)
    expected_out, expected_final = _oracle(q, k, v, log_a, initial_state)
    out, final = _ssd_with_state(*_f32(q, k, v, log_a, initial_state), impl=impl)
    assert out.shape == v.shape and out.dtype == jnp.float32 and final.dtype == jnp.float32
    _assert_close(out, expected_out, 1e-5)
    _assert_close(final, expected_final, 1e-5)


def _run_segments_as_rows(q, k, v, log_a, initial_state, bounds, impl):
    """Each segment of row 0 as its own row, starting at position 0 and right-padded to T with ``k = v = 0``,
    ``log_a = 0`` (which change no output of a real token and no state); only the first row gets the initial
    state. Returns the outputs of row 0 stitched back together and the last segment's final state."""
    length = q.shape[1]
    rows = [np.zeros((len(bounds) - 1, length) + x.shape[2:]) for x in (q, k, v, log_a)]
    for row, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        for padded, x in zip(rows, (q, k, v, log_a)):
            padded[row, : stop - start] = x[0, start:stop]
    states = np.zeros((len(bounds) - 1,) + initial_state.shape[1:])
    states[0] = initial_state[0]
    out, final = _ssd_with_state(*_f32(*rows, states), impl=impl)
    segments = zip(bounds[:-1], bounds[1:])
    stitched = np.concatenate([out[row, : stop - start] for row, (start, stop) in enumerate(segments)])
    return stitched, final[-1]


@pytest.mark.parametrize("impl", IMPLS)
def test_segments_match_oracle_and_separate_runs(impl):
    q, k, v, log_a, initial_state = _random_inputs(1, length=70)
    # Boundaries inside a chunk (11, 41), exactly on a chunk edge (32) and a one-token segment (40).
    bounds = [0, 11, 32, 40, 41, 70]
    segment_ids = np.zeros((2, 70), np.int32)
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        segment_ids[:, start:stop] = index + 1
    segment_ids[1] = 7  # the second row is one segment
    out, final = _ssd_with_state(*_f32(q, k, v, log_a, initial_state), impl=impl,
                                 segment_ids=jnp.asarray(segment_ids))
    expected_out, expected_final = _oracle(q, k, v, log_a, initial_state, segment_ids)
    _assert_close(out, expected_out, 1e-5)
    _assert_close(final, expected_final, 1e-5)
    separate_out, separate_final = _run_segments_as_rows(q, k, v, log_a, initial_state, bounds, impl)
    _assert_close(out[0], separate_out, 1e-5)
    _assert_close(final[0], separate_final, 1e-5)


def _loss(impl, q, k, v, log_a, initial_state, weights_out, weights_state):
    out, final = _ssd_with_state(q, k, v, log_a, initial_state, impl=impl)
    return jnp.sum(out * weights_out) + jnp.sum(final * weights_state)


def test_chunked_gradients_match_recurrent():
    q, k, v, log_a, initial_state = _random_inputs(2, length=37)
    rng = np.random.default_rng(3)
    weights_out = rng.standard_normal(v.shape)
    weights_state = rng.standard_normal(initial_state.shape)
    args = _f32(q, k, v, log_a, initial_state, weights_out, weights_state)
    grads = {impl: jax.jit(jax.grad(lambda *a, impl=impl: _loss(impl, *a), argnums=(0, 1, 2, 3, 4)))(*args)
             for impl in IMPLS}
    for name, chunked, recurrent in zip(("q", "k", "v", "log_a", "initial_state"), grads["chunked"],
                                        grads["recurrent"]):
        assert np.all(np.isfinite(chunked)), name
        assert np.abs(recurrent).max() > 1e-3, name  # a gradient that is really there
        _assert_close(chunked, recurrent, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
    q, k, v, log_a, initial_state = _random_inputs(4, length=37)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, log_a)]
    out = ssd(*bf16, initial_state=jnp.asarray(initial_state, jnp.float32), impl=impl, chunk_size=16)
    assert out.dtype == jnp.bfloat16
    rounded = [np.asarray(x.astype(jnp.float32), np.float64) for x in bf16]
    expected, _ = _oracle(*rounded, initial_state)
    _assert_close(out, expected, 1e-2)


def test_two_calls_with_state_equal_one_call():
    inputs = _f32(*_random_inputs(5, length=37))
    whole, whole_final = _ssd_with_state(*inputs, impl="chunked")
    *sequence, initial_state = inputs
    first, state = _ssd_with_state(*[x[:, :23] for x in sequence], initial_state, impl="chunked")
    second, final = _ssd_with_state(*[x[:, 23:] for x in sequence], state, impl="chunked")
    _assert_close(jnp.concatenate([first, second], axis=1), whole, 1e-5)
    _assert_close(final, whole_final, 1e-5)


def test_decode_steps_equal_parallel_form():
    inputs = _f32(*_random_inputs(6, length=37))
    parallel, parallel_final = _ssd_with_state(*inputs, impl="chunked")
    *sequence, state = inputs
    outputs = []
    for t in range(sequence[0].shape[1]):
        out_t, state = ssd_step(state, *[x[:, t] for x in sequence])
        outputs.append(out_t)
    _assert_close(jnp.stack(outputs, axis=1), parallel, 1e-5)
    _assert_close(state, parallel_final, 1e-5)


def test_bad_inputs_raise_clear_errors():
    q, k, v, log_a, _ = _f32(*_random_inputs(7, length=9)[:4], np.zeros(1))
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        ssd(q, k, v, log_a, impl="fast")
    with pytest.raises(ValueError, match="multiple of q/k's groups G=2"):
        ssd(q, k, v[:, :, :3], log_a[:, :, :3])
    with pytest.raises(ValueError, match="log_a must be"):
        ssd(q, k, v, log_a[:, :-1])
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive integer"):
        ssd(q, k, v, log_a, chunk_size=0)
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd(q, k, v, log_a, initial_state=jnp.zeros((2, 4, 3, 3)))


@pytest.mark.slow
def test_64k_tokens_bfloat16_chunked_is_finite():
    length = 65536
    rng = np.random.default_rng(9)
    q = jnp.asarray(rng.standard_normal((1, length, 1, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, length, 1, 16)) / 4, jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, length, 2, 16)), jnp.bfloat16)
    # Strong and near-zero decays: exp(cum) spans many orders of magnitude within a chunk.
    log_a = jnp.asarray(-rng.uniform(0.0, 8.0, (1, length, 2)) * (rng.uniform(size=(1, length, 2)) < 0.5),
                        jnp.bfloat16)
    out, final = jax.jit(lambda *a: ssd(*a, return_final_state=True))(q, k, v, log_a)
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))) and bool(jnp.all(jnp.isfinite(final)))
    assert float(jnp.abs(out.astype(jnp.float32)).max()) > 0.1
