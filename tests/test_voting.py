"""Test-time voting rules: hand-worked cases, ties, missing answers, and subset accuracy."""

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.voting import confidence_weighted_vote, majority_vote, max_confidence_answer, voting_accuracy


def test_the_three_rules_on_a_hand_worked_case():
    answers = ["3", "5", "5", "3", "3", None]
    confidences = [0.1, 0.9, 0.8, 0.2, 0.3, 1.0]
    assert majority_vote(answers) == "3"  # 3 votes vs 2
    assert confidence_weighted_vote(answers, confidences) == "5"  # 1.7 vs 0.6
    assert max_confidence_answer(answers, confidences) == "5"  # the None sample (q = 1) does not count


def test_ties_go_to_the_first_seen_answer_and_no_answer_gives_none():
    assert majority_vote(["7", "4", "4", "7"]) == "7"
    assert confidence_weighted_vote(["7", "4"], [0.5, 0.5]) == "7"
    assert max_confidence_answer(["7", "4"], [0.5, 0.5]) == "7"
    assert majority_vote([None, None]) is None and max_confidence_answer([None], [0.3]) is None
    with pytest.raises(ConfigError, match="one per answer"):
        confidence_weighted_vote(["1"], [0.1, 0.2])


def test_voting_accuracy_with_all_samples_is_the_rule_applied_once():
    """Using all N samples, any draw is a reordering; with no ties possible the vote is order-free."""
    rng = np.random.default_rng(0)
    answers = rng.integers(0, 2, size=(40, 5)).tolist()  # two answers, odd N: no majority ties
    confidences = rng.random((40, 5)).tolist()  # distinct floats: no confidence ties
    golds = rng.integers(0, 2, size=40).tolist()
    for rule, vote in [("majority", majority_vote), ("confidence_weighted", confidence_weighted_vote),
                       ("max_confidence", max_confidence_answer)]:
        expected = np.mean([vote(a, q) == g for a, q, g in zip(answers, confidences, golds)])
        assert voting_accuracy(answers, confidences, golds, 5, rule=rule, num_draws=3) == pytest.approx(expected)
    # One sample per draw: the mean accuracy of single samples.
    single = np.mean([[a == g for a in row] for row, g in zip(answers, golds)])
    one_sample = voting_accuracy(answers, confidences, golds, 1, rule="majority", num_draws=400)
    assert one_sample == pytest.approx(single, abs=0.02)
    with pytest.raises(ConfigError, match="num_samples"):
        voting_accuracy(answers, confidences, golds, 6, rule="majority")
