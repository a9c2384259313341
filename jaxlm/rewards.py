"""Rewards for RL with calibration rewards (RLCR; Damani et al. 2025, Sec. 3) and its RLVR baseline.

A completion states an answer, an uncertainty analysis and a confidence, in that order:

    <answer>12</answer><analysis>two digits are hidden</analysis><confidence>0.25</confidence>

Format rules (``parse_completion``): all three tag pairs present; when a tag occurs several times the
**last** one counts; the last answer ends before the last analysis starts, which ends before the last
confidence starts; only whitespace may follow the last ``</confidence>``; the confidence is a float
``q`` with ``0 <= q <= 1``. Answers are compared after stripping surrounding whitespace.

    RLCR:  R = 1[correct] − (q − 1[correct])²     (format failure: R = 0)
    RLVR:  R = 1[correct]                          (answer tag only; no confidence needed)

The Brier term is a bounded proper scoring rule: for a fixed answer that is right with probability p,
``E[R] = p − (q − p)² − p(1 − p)`` is maximised at ``q = p``.

``batched(score)`` turns a per-completion score ``score(completion, gold)`` into the reward-function
signature of ``jaxlm.train.grpo``: ``reward(prompts, completions, *, gold, **fields) -> list[float]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

ANSWER, ANALYSIS, CONFIDENCE = "answer", "analysis", "confidence"
TAGS = (ANSWER, ANALYSIS, CONFIDENCE)


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
    """The contents of a well-formed completion's last answer, analysis and confidence tags."""

    answer: str  # stripped
    analysis: str
    confidence: float  # in [0, 1]


def _last_tag(completion: str, tag: str) -> re.Match | None:
    """The last ``<tag>…</tag>`` span of ``completion`` (contents may span lines), or None."""
    matches = list(re.finditer(rf"<{tag}>(.*?)</{tag}>", completion, flags=re.DOTALL))
    return matches[-1] if matches else None


def parse_confidence(text: str) -> float | None:
    """``float(text)`` when it is a finite number in [0, 1], else None (``"nan"``, ``"1.5"``, ``"high"``)."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def parse_completion(completion: str) -> ParsedCompletion | None:
    """The last answer/analysis/confidence of ``completion``, or None when it breaks a format rule."""
    spans = {tag: _last_tag(completion, tag) for tag in TAGS}
    if any(span is None for span in spans.values()):
        return None
    answer, analysis, confidence = (spans[tag] for tag in TAGS)
    in_order = answer.end() <= analysis.start() and analysis.end() <= confidence.start()
    nothing_after = completion[confidence.end():].strip() == ""
    q = parse_confidence(confidence.group(1))
    if not (in_order and nothing_after) or q is None:
        return None
    return ParsedCompletion(answer=answer.group(1).strip(), analysis=analysis.group(1), confidence=q)


def extract_answer(completion: str) -> str | None:
    """The stripped contents of the last ``<answer>`` tag, or None when there is none (RLVR's parser)."""
    span = _last_tag(completion, ANSWER)
    return None if span is None else span.group(1).strip()


def is_correct(answer: str | None, gold: str) -> bool:
    """``answer == gold`` after stripping whitespace from both; a missing answer is wrong."""
    return answer is not None and answer.strip() == str(gold).strip()


def format_reward(completion: str, gold: str | None = None) -> float:
    """1 when ``completion`` follows every format rule, else 0 (``gold`` is ignored)."""
    return float(parse_completion(completion) is not None)


def correctness_reward(completion: str, gold: str) -> float:
    """1 when the well-formed completion's answer is ``gold``, else 0 (format failures score 0)."""
    parsed = parse_completion(completion)
    return float(parsed is not None and is_correct(parsed.answer, gold))


def stated_confidence(completion: str, gold: str | None = None) -> float:
    """The confidence q of a well-formed completion, NaN otherwise (for logging; not a reward)."""
    parsed = parse_completion(completion)
    return math.nan if parsed is None else parsed.confidence


def rlcr_reward(completion: str, gold: str) -> float:
    """``1[c] − (q − 1[c])²`` with c = the answer is ``gold`` and q the stated confidence; 0 on format failure."""
    parsed = parse_completion(completion)
    if parsed is None:
        return 0.0
    correct = float(is_correct(parsed.answer, gold))
    return correct - (parsed.confidence - correct) ** 2


def rlvr_reward(completion: str, gold: str) -> float:
    """``1[c]``: 1 when the last answer tag holds ``gold``, else 0 (no confidence is required)."""
    return float(is_correct(extract_answer(completion), gold))


RewardFunction = Callable[..., list[float]]


def batched(score: Callable[[str, str], float]) -> RewardFunction:
    """``reward(prompts, completions, *, gold, **fields) -> [score(completion_i, gold_i)]`` for GRPO."""

    def reward(prompts: Sequence[str], completions: Sequence[str], *, gold: Sequence[str], **fields) -> list[float]:
        if len(completions) != len(gold):
            raise ValueError(f"got {len(completions)} completions but {len(gold)} gold answers; need one each")
        return [float(score(completion, answer)) for completion, answer in zip(completions, gold)]

    reward.__name__ = f"batched_{score.__name__}"
    reward.__doc__ = f"Batched {score.__name__}: {score.__doc__}"
    return reward
