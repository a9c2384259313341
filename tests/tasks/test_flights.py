"""Flight task and Bayesian assistant: enumeration, choice rule, posterior, and the paper's accuracy curve."""

import itertools
from fractions import Fraction

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.tasks.flights import (FLIGHTS, HOTELS, PreferenceTask, assistant_accuracy, bayesian_recommendations,
                                 choices_of, consistency, enumerate_users, flights_with_features, option_features,
                                 posterior_predictive, posteriors, sample_option_levels, user_choices, user_weights)

PAPER_ACCURACY = np.array([40.6, 57.7, 66.9, 73.2, 78.0, 81.5])
TOY = PreferenceTask("toy", ("a", "b"), (3, 3))  # levels 0, 0.5, 1


def exact_choice(weights, features) -> int:
    """Brute force in exact rationals: the first option with the largest reward."""
    rewards = [sum(Fraction(float(w)) * f for w, f in zip(weights, option)) for option in features]
    return rewards.index(max(rewards))


def rational_features(task, levels):
    return [[Fraction(int(level), task.feature_levels[k] - 1) for k, level in enumerate(option)] for option in levels]


def test_enumeration_has_624_distinct_nonzero_users_in_product_order():
    users = enumerate_users(4)
    assert users.shape == (624, 4)
    assert len({tuple(u) for u in users}) == 624
    assert not np.any(np.all(users == 0, axis=1))
    expected = [u for u in itertools.product((-1, -0.5, 0, 0.5, 1), repeat=4) if any(u)]
    np.testing.assert_array_equal(user_weights(users), expected)
    assert [len(enumerate_users(n)) for n in (2, 3, 5)] == [24, 124, 3124]


def test_tasks_have_the_paper_feature_levels_and_normalise_to_unit_interval():
    assert FLIGHTS.feature_levels == (11, 11, 3, 11) and HOTELS.feature_levels == (11, 11, 5, 5)
    assert flights_with_features(6).feature_levels == (11, 11, 3, 11, 11, 11)
    levels = sample_option_levels(HOTELS, np.random.default_rng(0), (2000,))  # [2000, 3, 4]
    for k, count in enumerate(HOTELS.feature_levels):
        assert set(np.unique(levels[..., k])) == set(range(count))  # every level is drawn
    features = option_features(HOTELS, levels)
    np.testing.assert_allclose(features, levels / (np.array(HOTELS.feature_levels) - 1), rtol=1e-6)


@pytest.mark.parametrize("task", [FLIGHTS, HOTELS, flights_with_features(3)])
def test_choices_match_exact_brute_force_with_ties_to_lowest_index(task):
    rng = np.random.default_rng(1)
    users = enumerate_users(task.num_features)[rng.choice(len(enumerate_users(task.num_features)), 40)]  # [40, F]
    levels = sample_option_levels(task, rng, (40, 25))  # [40, 25, 3, F]
    got = user_choices(task, users, levels)  # [40, 25]
    weights = user_weights(users)
    expected = [[exact_choice(weights[n], rational_features(task, levels[n, s])) for s in range(25)] for n in range(40)]
    np.testing.assert_array_equal(got, expected)
    # Ties occur in this sample, so the lowest-index rule is exercised.
    rewards = np.einsum("nsof,nf->nso", option_features(task, levels).astype(np.float64), weights)  # [40, 25, 3]
    assert np.sum(np.isclose(rewards, rewards.max(-1, keepdims=True)).sum(-1) > 1) > 10


def test_ties_go_to_the_lowest_option_index():
    user = np.array([[2, 0]])  # w = (1, 0): only the first feature matters
    levels = np.array([[[[0, 0], [2, 1], [2, 2]], [[2, 2], [2, 0], [1, 1]]]])  # [1, 2, 3, 2]
    np.testing.assert_array_equal(user_choices(TOY, user, levels), [[1, 0]])


def test_two_round_posterior_and_prediction_by_hand():
    """2 features with levels {0, .5, 1}. Round 1 shows A=(1,0), B=(0,1), C=(0,0) and the user picks A:
    consistent are w1 >= w2 and w1 >= 0 -> 11 hypotheses. Round 2 shows A=(0,0), B=(0,1), C=(1,1) and the
    user picks C: also w1 > 0 and w1 + w2 > 0 -> (.5,0) (.5,.5) (1,-.5) (1,0) (1,.5) (1,1). On A=(0,1),
    B=(1,0), C=(.5,.5) these pick B, A(tie), B, B, B, A(tie): predictive (2/6, 4/6, 0) -> B."""
    users = enumerate_users(2)
    weights = [tuple(w) for w in user_weights(users)]
    rounds = np.array([[[2, 0], [0, 2], [0, 0]], [[0, 0], [0, 2], [2, 2]]]) * 10  # grid units [2, 3, 2]
    consistent = consistency(choices_of(users, rounds), np.array([0, 2]))  # [2, 24]
    posterior = np.asarray(posteriors(consistent))  # [3, 24]
    np.testing.assert_allclose(posterior[0], np.full(24, 1 / 24), rtol=1e-6)
    after_one = {w for w, p in zip(weights, posterior[1]) if p > 0}
    assert after_one == {w for w in weights if w[0] >= w[1] and w[0] >= 0} and len(after_one) == 11
    np.testing.assert_allclose(posterior[1][posterior[1] > 0], 1 / 11, rtol=1e-6)
    after_two = {w for w, p in zip(weights, posterior[2]) if p > 0}
    assert after_two == {(0.5, 0), (0.5, 0.5), (1, -0.5), (1, 0), (1, 0.5), (1, 1)}
    query = np.array([[0, 2], [2, 0], [1, 1]]) * 10  # [3, 2]
    predictive = np.asarray(posterior_predictive(posterior[2], choices_of(users, query)))
    np.testing.assert_allclose(predictive, [2 / 6, 4 / 6, 0], rtol=1e-6)
    levels = np.array([[[2, 0], [0, 2], [0, 0]], [[0, 0], [0, 2], [2, 2]]])[None]  # [1, 2, 3, 2]
    queries = np.stack([levels[0, 0], levels[0, 1], np.array([[0, 2], [2, 0], [1, 1]])])[None]  # [1, 3, 3, 2]
    np.testing.assert_array_equal(bayesian_recommendations(TOY, levels, np.array([[0, 2]]), queries)[0, 2], 1)


def reference_recommendations(task, levels, choices, queries):
    """Float64 loops over dialogues and hypotheses (ties within 1e-9 go to the lowest index)."""
    weights = user_weights(enumerate_users(task.num_features)).astype(np.float64)  # [H, F]

    def picks(option_levels):  # [3, F] -> [H]
        rewards = weights @ (option_levels / (np.array(task.feature_levels) - 1.0)).T  # [H, 3]
        return np.argmax(rewards >= rewards.max(1, keepdims=True) - 1e-9, axis=1)

    out = np.zeros(queries.shape[:2], np.int64)
    for n in range(len(levels)):
        alive = np.ones(len(weights))
        for q in range(queries.shape[1]):
            predictive = np.bincount(picks(queries[n, q]), weights=alive / alive.sum(), minlength=3)
            out[n, q] = np.argmax(predictive >= predictive.max() - 1e-9)
            if q < levels.shape[1]:
                alive = alive * (picks(levels[n, q]) == choices[n, q])
    return out


@pytest.mark.parametrize("task", [FLIGHTS, flights_with_features(3)])
def test_bayesian_recommendations_match_float64_reference(task):
    rng = np.random.default_rng(2)
    all_users = enumerate_users(task.num_features)
    users = all_users[rng.integers(0, len(all_users), 30)]
    levels = sample_option_levels(task, rng, (30, 5))  # [30, 5, 3, F]
    queries = sample_option_levels(task, rng, (30, 6))
    choices = user_choices(task, users, levels)
    got = bayesian_recommendations(task, levels, choices, queries)
    np.testing.assert_array_equal(got, reference_recommendations(task, levels, choices, queries))
    in_dialogue = bayesian_recommendations(task, levels, choices, levels)
    np.testing.assert_array_equal(in_dialogue, reference_recommendations(task, levels, choices, levels))


def test_assistant_accuracy_reproduces_the_paper_curve():
    accuracy = 100 * assistant_accuracy(rounds=5, seed=0, sets_per_user=20)
    assert accuracy.shape == (6,)
    np.testing.assert_allclose(accuracy, PAPER_ACCURACY, atol=2.0)
    assert np.all(np.diff(accuracy) > 0)


@pytest.mark.parametrize("make, match", [
    (lambda: flights_with_features(9), "2 to 8"),
    (lambda: PreferenceTask("bad", ("a", "b"), (4, 11)), "dividing 20"),
    (lambda: PreferenceTask("bad", ("a",), (11, 11)), "one level count"),
    (lambda: assistant_accuracy(sets_per_user=0), "positive"),
    (lambda: bayesian_recommendations(FLIGHTS, np.zeros((1, 2, 3, 4), int), np.zeros((1, 2), int),
                                      np.zeros((1, 4, 3, 4), int)), "at most R \\+ 1"),
    (lambda: user_choices(FLIGHTS, enumerate_users(4)[:1], np.full((1, 1, 3, 4), 11)), "levels below"),
])
def test_bad_input_names_the_field(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
