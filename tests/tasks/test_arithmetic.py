"""Sums with hidden digits: tokenizer, splits, the known optimal confidence, and the format warm-up."""

import collections

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.rewards import parse_completion
from jaxlm.tasks.arithmetic import (ArithmeticProblem, ArithmeticTokenizer, format_completion,
                                    format_warmup_example, prompt_tokens, sample_problem)


def test_tokenizer_round_trip_with_tags_as_single_tokens():
    tokenizer = ArithmeticTokenizer()
    text = "{147}+3=" + format_completion("10", 0.333)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == "{147}+3=<answer>10</answer><analysis></analysis><confidence>0.33</confidence>"
    assert len(tokenizer.encode("<answer>")) == 1 and min(ids) >= 3 and max(ids) < tokenizer.vocab_size
    with pytest.raises(ValueError, match="unknown symbol"):
        tokenizer.encode("x")


def test_optimal_confidence_by_hand():
    problem = ArithmeticProblem(first=(1, 2), second=(3, 4), hidden=(2, 3))
    assert problem.prompt == "{12}+{34}=" and problem.gold == "5"
    assert problem.answer_probabilities() == {"4": 0.25, "5": 0.5, "6": 0.25}
    assert problem.optimal_confidence(" 5 ") == 0.5 and problem.optimal_confidence("9") == 0.0
    assert problem.optimal_confidence(None) == 0.0 and problem.best_accuracy() == 0.5
    assert ArithmeticProblem(first=(7,), second=(2,), hidden=(7, 2)).prompt == "7+2="


def test_splits_and_that_gold_answers_are_right_with_probability_q_star():
    """Monte Carlo: over many problems, the gold equals a fixed consistent answer with frequency mean q*."""
    rng = np.random.default_rng(0)
    problems = [sample_problem(rng, "train") for _ in range(4000)]
    sizes = collections.Counter(tuple(sorted((len(p.first), len(p.second)))) for p in problems)
    assert set(sizes) == {(1, 1), (1, 2), (1, 3), (1, 4)}
    for problem in problems[:200]:
        probabilities = problem.answer_probabilities()
        assert sum(probabilities.values()) == pytest.approx(1.0) and problem.gold in probabilities
        k = max(len(problem.first), len(problem.second))
        assert set(probabilities.values()) == {1 / k}
    smallest = [min(p.answer_probabilities(), key=int) for p in problems]
    hits = np.mean([p.gold == s for p, s in zip(problems, smallest)])
    assert hits == pytest.approx(np.mean([p.optimal_confidence(s) for p, s in zip(problems, smallest)]), abs=0.03)
    ood = [sample_problem(rng, "ood") for _ in range(200)]
    assert all(len(p.first) in (2, 3) and len(p.second) in (2, 3) for p in ood)
    with pytest.raises(ConfigError, match="split"):
        sample_problem(rng, "test")


def test_warmup_example_learns_a_well_formed_consistent_completion_only():
    tokenizer = ArithmeticTokenizer()
    rng = np.random.default_rng(1)
    problem = sample_problem(rng)
    tokens, learn = format_warmup_example(problem, tokenizer, rng)
    prompt = prompt_tokens(problem, tokenizer)
    assert tokens[: len(prompt)] == prompt and not any(learn[: len(prompt)]) and all(learn[len(prompt):])
    assert tokens[-1] == tokenizer.eos_id
    parsed = parse_completion(tokenizer.decode(tokens[len(prompt):]))
    assert parsed is not None and problem.optimal_confidence(parsed.answer) > 0
