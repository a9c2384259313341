"""RLCR / RLVR rewards: the format rules, their edge cases, and the scoring rule's optimum."""

import math

import numpy as np
import pytest

from jaxlm.rewards import (batched, correctness_reward, extract_answer, format_reward, parse_completion,
                           rlcr_reward, rlvr_reward, stated_confidence)

GOOD = "<answer>12</answer><analysis>one digit hidden</analysis><confidence>0.25</confidence>"


def test_well_formed_completion_is_parsed():
    parsed = parse_completion(GOOD)
    assert (parsed.answer, parsed.analysis, parsed.confidence) == ("12", "one digit hidden", 0.25)
    assert format_reward(GOOD) == 1.0 and stated_confidence(GOOD) == 0.25


@pytest.mark.parametrize("completion", [
    "<analysis>x</analysis><confidence>0.5</confidence>",  # no answer
    "<answer>12</answer><confidence>0.5</confidence>",  # no analysis
    "<answer>12</answer><analysis>x</analysis>",  # no confidence
    "<answer>12</answer><analysis>x</analysis><confidence>0.5",  # unclosed confidence
    "<answer>12</answer><analysis>x</analysis><confidence>0.5</confidence> and more",  # text after
    "<answer>12</answer><analysis>x</analysis><confidence>0.5</confidence><answer>3</answer>",  # tag after
    "<confidence>0.5</confidence><answer>12</answer><analysis>x</analysis>",  # wrong order
    "<answer>12</answer><analysis>x</analysis><confidence>1.5</confidence>",  # q > 1
    "<answer>12</answer><analysis>x</analysis><confidence>-0.1</confidence>",  # q < 0
    "<answer>12</answer><analysis>x</analysis><confidence>nan</confidence>",  # not finite
    "<answer>12</answer><analysis>x</analysis><confidence>high</confidence>",  # not a number
    "<answer>12</answer><analysis>x</analysis><confidence></confidence>",  # empty
])
def test_format_failures_score_zero(completion):
    assert parse_completion(completion) is None
    assert rlcr_reward(completion, "12") == 0.0
    assert format_reward(completion) == 0.0 and correctness_reward(completion, "12") == 0.0
    assert math.isnan(stated_confidence(completion))


def test_last_answer_and_confidence_win():
    completion = ("<answer>3</answer><answer>12</answer><analysis>a</analysis><confidence>0.9</confidence>"
                  "<analysis>b</analysis><confidence>0.4</confidence>")
    parsed = parse_completion(completion)
    assert (parsed.answer, parsed.analysis, parsed.confidence) == ("12", "b", 0.4)
    assert rlcr_reward(completion, "12") == pytest.approx(1 - 0.6**2)
    assert rlvr_reward("<answer>12</answer> then <answer>3</answer>", "3") == 1.0


def test_whitespace_is_ignored_around_answer_confidence_and_at_the_end():
    completion = "<answer> 12\n</answer>\n<analysis>\nmulti\nline\n</analysis> <confidence> 0.5 </confidence>\n  "
    assert parse_completion(completion).answer == "12"
    assert rlcr_reward(completion, " 12 ") == pytest.approx(1 - 0.25)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.77, 1.0])
def test_rlcr_reward_values(q):
    right = f"<answer>7</answer><analysis></analysis><confidence>{q}</confidence>"
    assert rlcr_reward(right, "7") == pytest.approx(1 - (q - 1) ** 2)
    assert rlcr_reward(right, "8") == pytest.approx(-(q**2))
    assert rlvr_reward(right, "7") == 1.0 and rlvr_reward(right, "8") == 0.0


def test_rlvr_needs_no_confidence():
    assert rlvr_reward("<answer>7</answer>", "7") == 1.0
    assert rlvr_reward("7", "7") == 0.0


def test_expected_rlcr_reward_peaks_at_the_true_probability():
    """For an answer right with probability p, E[R](q) over a grid of q is maximised at q = p."""
    grid = np.round(np.linspace(0, 1, 101), 2)
    for p in (0.1, 0.25, 0.5, 0.9):
        expected = [p * rlcr_reward(f"<answer>1</answer><analysis></analysis><confidence>{q}</confidence>", "1")
                    + (1 - p) * rlcr_reward(f"<answer>1</answer><analysis></analysis><confidence>{q}</confidence>", "2")
                    for q in grid]
        assert grid[int(np.argmax(expected))] == pytest.approx(p)


def test_batched_reward_matches_per_completion_scores_and_checks_lengths():
    reward = batched(rlcr_reward)
    completions = [GOOD, "<answer>1</answer>", GOOD]
    assert reward(["p"] * 3, completions, gold=["12", "1", "3"]) == pytest.approx([1 - 0.75**2, 0.0, -0.0625])
    assert batched(rlvr_reward)(["p"] * 3, completions, gold=["12", "1", "3"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="gold answers"):
        reward(["p"], [GOOD], gold=["1", "2"])
    assert extract_answer("no tags") is None
