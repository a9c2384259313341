"""Causal depthwise conv against a float64 numpy loop; state carry; step == parallel; segments."""

import jax.numpy as jnp
import numpy as np

from jaxlm.ops.conv import causal_conv1d, causal_conv1d_step


def numpy_conv(x, weight, bias, segment_ids=None):
    batch, length, channels = x.shape
    width = weight.shape[0]
    y = np.zeros((batch, length, channels)) + bias
    for b in range(batch):
        for t in range(length):
            for j in range(width):
                s = t - (width - 1) + j
                if s >= 0 and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t]):
                    y[b, t] += weight[j] * x[b, s]
    return y


def random_inputs(seed, batch=2, length=13, channels=5, width=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, length, channels)), rng.normal(size=(width, channels)), rng.normal(size=channels)


def test_matches_numpy_and_final_state():
    x, w, b = random_inputs(0)
    y, state = causal_conv1d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), numpy_conv(x, w, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state), x[:, -3:], rtol=1e-6)


def test_split_call_with_state_and_steps_equal_one_call():
    x, w, b = random_inputs(1)
    x32, w32, b32 = (jnp.asarray(a, jnp.float32) for a in (x, w, b))
    full, _ = causal_conv1d(x32, w32, b32)
    first, state = causal_conv1d(x32[:, :6], w32, b32)
    second, state = causal_conv1d(x32[:, 6:10], w32, b32, initial_state=state)
    steps = []
    for t in range(10, 13):
        y_t, state = causal_conv1d_step(state, x32[:, t], w32, b32)
        steps.append(y_t)
    joined = jnp.concatenate([first, second, jnp.stack(steps, axis=1)], axis=1)
    np.testing.assert_allclose(np.asarray(joined), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_segments_do_not_leak():
    x, w, b = random_inputs(2, length=11)
    segment_ids = np.array([[1] * 4 + [2] * 5 + [3] * 2, [1] * 11])
    y, _ = causal_conv1d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
                         segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_allclose(np.asarray(y), numpy_conv(x, w, b, segment_ids), rtol=1e-5, atol=1e-5)
