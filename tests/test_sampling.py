"""Token sampling: greedy, top-k, nucleus and temperature, against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.sampling import SamplingConfig, sample_tokens

VOCAB = 37
DRAWS = 20000


def _random_logits(seed, rows=1, vocab=VOCAB, scale=2.0):
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def _draw_many(logits_row, sampling, seed=0):
    """DRAWS independent samples from one row of logits (the row tiled over the batch)."""
    batch = jnp.tile(jnp.asarray(logits_row)[None, :], (DRAWS, 1))
    sample = jax.jit(sample_tokens, static_argnums=2)
    return np.asarray(sample(batch, jax.random.key(seed), sampling))


def _softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _assert_frequencies_match(draws, probs):
    """Each token's frequency within 5 standard errors (plus a little slack) of its probability."""
    counts = np.bincount(draws, minlength=len(probs)) / len(draws)
    tolerance = 5 * np.sqrt(probs * (1 - probs) / len(draws)) + 1e-3
    np.testing.assert_array_less(np.abs(counts - probs), tolerance)


def test_greedy_is_argmax():
    logits = _random_logits(0, rows=5, vocab=1001)
    tokens = sample_tokens(jnp.asarray(logits), jax.random.key(0), SamplingConfig())
    assert tokens.dtype == jnp.int32 and tokens.shape == (5,)
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_temperature_frequencies_match_softmax():
    logits = _random_logits(1)[0]
    temperature = 1.7
    draws = _draw_many(logits, SamplingConfig(temperature=temperature))
    _assert_frequencies_match(draws, _softmax64(logits / temperature))


def test_top_k_never_leaves_the_top_k_and_renormalises():
    logits = _random_logits(2, scale=0.5)[0]  # flat-ish: outside tokens would be drawn often if allowed
    k = 5
    draws = _draw_many(logits, SamplingConfig(temperature=1.0, top_k=k), seed=3)
    top = np.argsort(-logits)[:k]
    assert set(np.unique(draws)) == set(top.tolist())
    expected = np.zeros(VOCAB)
    expected[top] = _softmax64(logits[top])
    _assert_frequencies_match(draws, expected)


def _numpy_nucleus(probs, top_p):
    """Indices of the smallest set of most likely tokens whose probability reaches top_p."""
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    size = int(np.searchsorted(cumulative, top_p) + 1)
    return order[:size]


def test_top_p_samples_exactly_the_nucleus():
    logits = _random_logits(4)[0]
    temperature = 0.9
    probs = _softmax64(logits / temperature)
    cumulative = np.cumsum(np.sort(probs)[::-1])
    # A threshold half-way between two cumulative sums, so float32 rounding cannot move the boundary.
    top_p = float((cumulative[3] + cumulative[4]) / 2)
    nucleus = _numpy_nucleus(probs, top_p)
    assert len(nucleus) == 5
    draws = _draw_many(logits, SamplingConfig(temperature=temperature, top_p=top_p), seed=5)
    assert set(np.unique(draws)) == set(nucleus.tolist())
    expected = np.zeros(VOCAB)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    _assert_frequencies_match(draws, expected)


def test_top_k_then_top_p_uses_the_renormalised_top_k():
    logits = _random_logits(6, scale=1.0)[0]
    k = 8
    top = np.argsort(-logits)[:k]
    top_probs = _softmax64(logits[top])  # renormalised over the top k, descending
    cumulative = np.cumsum(top_probs)
    top_p = float((cumulative[2] + cumulative[3]) / 2)
    draws = _draw_many(logits, SamplingConfig(temperature=1.0, top_k=k, top_p=top_p), seed=7)
    assert set(np.unique(draws)) == set(top[:4].tolist())


def test_each_row_uses_its_own_logits():
    logits = _random_logits(8, rows=2, scale=0.1)
    logits[0, 3] += 50.0  # row 0 can only realistically draw token 3, row 1 only token 11
    logits[1, 11] += 50.0
    tokens = sample_tokens(jnp.asarray(logits), jax.random.key(1), SamplingConfig(temperature=1.0, top_k=4))
    np.testing.assert_array_equal(np.asarray(tokens), [3, 11])


@pytest.mark.parametrize("field, kwargs", [
    ("sampling.temperature", dict(temperature=-0.5)),
    ("sampling.top_k", dict(top_k=-1)),
    ("sampling.top_k", dict(top_k=2.5)),
    ("sampling.top_p", dict(top_p=0.0)),
    ("sampling.top_p", dict(top_p=1.5)),
])
def test_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ConfigError) as error:
        SamplingConfig(**kwargs).validate()
    assert error.value.field == field


def test_valid_config_passes():
    config = SamplingConfig(temperature=0.7, top_k=10, top_p=0.9)
    assert config.validate() is config
