"""Test-time scaling over N sampled answers ``a_1 … a_N`` with stated confidences ``q_1 … q_N``.

    majority vote:              argmax_a Σ_i 1[a_i = a]
    confidence-weighted vote:   argmax_a Σ_i q_i · 1[a_i = a]
    max-confidence selection:   a_{argmax_i q_i}

Samples without an answer (``None``, e.g. a format failure) take no part. Ties go to the answer that
appears first among the samples, so every rule is deterministic; with no answer at all the result is None.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

from jaxlm.errors import require

Answer = Hashable | None


def _weighted_vote(answers: Sequence[Answer], weights: Sequence[float]) -> Answer:
    """``argmax_a Σ_i w_i 1[a_i = a]`` over the answers that are not None; first-seen wins ties."""
    require(len(answers) == len(weights), "confidences", f"{len(weights)} values", f"one per answer ({len(answers)})")
    totals: dict[Hashable, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(weight)
    if not totals:
        return None
    best = max(totals.values())
    return next(answer for answer, total in totals.items() if total == best)


def majority_vote(answers: Sequence[Answer], confidences: Sequence[float] | None = None) -> Answer:
    """The most frequent answer (``confidences`` is accepted for a uniform signature and ignored)."""
    return _weighted_vote(answers, [1.0] * len(answers))


def confidence_weighted_vote(answers: Sequence[Answer], confidences: Sequence[float]) -> Answer:
    """The answer with the largest summed confidence ``Σ_i q_i 1[a_i = a]``."""
    return _weighted_vote(answers, confidences)


def max_confidence_answer(answers: Sequence[Answer], confidences: Sequence[float]) -> Answer:
    """The answer of the most confident sample (the first such sample on ties)."""
    require(len(answers) == len(confidences), "confidences", f"{len(confidences)} values",
            f"one per answer ({len(answers)})")
    candidates = [(q, -i, a) for i, (a, q) in enumerate(zip(answers, confidences)) if a is not None]
    return max(candidates)[2] if candidates else None


VOTING_RULES: dict[str, Callable[[Sequence[Answer], Sequence[float]], Answer]] = {
    "majority": majority_vote,
    "confidence_weighted": confidence_weighted_vote,
    "max_confidence": max_confidence_answer,
}


def voting_accuracy(answers: Sequence[Sequence[Answer]], confidences: Sequence[Sequence[float]],
                    golds: Sequence[Hashable], num_samples: int, *, rule: str, num_draws: int = 8,
                    seed: int = 0) -> float:
    """Accuracy of ``rule`` using ``num_samples`` of each prompt's samples, averaged over random subsets.

    ``answers[p][i]`` / ``confidences[p][i]`` are sample i of prompt p (N samples each). Each of
    ``num_draws`` draws picks ``num_samples`` of the N samples without replacement for every prompt;
    the result is ``mean_{draw, p} 1[rule(subset) = golds[p]]``.
    """
    require(rule in VOTING_RULES, "rule", rule, f"one of {tuple(VOTING_RULES)}")
    require(len(answers) == len(confidences) == len(golds) > 0, "answers", f"{len(answers)} prompts",
            f"a non-empty list with one entry per gold answer ({len(golds)}) and per confidence list")
    total_samples = min(len(row) for row in answers)
    require(isinstance(num_samples, int) and 1 <= num_samples <= total_samples, "num_samples", num_samples,
            f"an integer in [1, {total_samples}] (the samples per prompt)")
    vote = VOTING_RULES[rule]
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(num_draws):
        for row_answers, row_confidences, gold in zip(answers, confidences, golds):
            chosen = rng.choice(len(row_answers), size=num_samples, replace=False)  # [num_samples]
            picked = vote([row_answers[i] for i in chosen], [row_confidences[i] for i in chosen])
            hits += picked is not None and picked == gold
    return hits / (num_draws * len(golds))
