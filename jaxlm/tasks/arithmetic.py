"""Sums with hidden digits: a toy task for RLCR where correctness is checkable and the best confidence known.

A problem adds two digits, but an operand may be shown only as the set of digits it could be, e.g.

    3+{147}=        the second digit is 1, 4 or 7 (each equally likely); the answer is 4, 7 or 10

The hidden digits are drawn uniformly from their sets and fix the gold answer. An answer ``s`` is right
with probability ``q*(s) = #{(a, b) ∈ A × B : a + b = s} / (|A| |B|)``, so the calibrated confidence of
an answer is ``q*(s)``, and with one set of k digits ``q* = 1/k`` for every consistent answer
(REFERENCE.md §5, "sums with masked digits").

Splits: ``"train"`` (in-domain): one operand is a plain digit, the other a set of k ∈ {1, 2, 3, 4} digits
(k = 1 is a plain digit); ``"ood"`` (harder): both operands are sets of 2 or 3 digits, so the answers are
not equally likely.

The tokenizer is character level with the RLCR tags as single tokens; a completion is
``<answer>s</answer><analysis></analysis><confidence>0.33</confidence>`` then ``<eos>``.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Sequence

import numpy as np

from jaxlm.errors import require
from jaxlm.tasks.symbols import BOS_ID, EOS_ID, PAD_ID, SymbolTokenizer

DIGITS = tuple("0123456789")
TAG_TOKENS = ("<answer>", "</answer>", "<analysis>", "</analysis>", "<confidence>", "</confidence>")
SYMBOLS = DIGITS + ("+", "=", "{", "}", ".") + TAG_TOKENS
SPLITS = {"train": ((1,), (1, 2, 3, 4)), "ood": ((2, 3), (2, 3))}  # split -> (sizes of one set, of the other)
_PIECES = re.compile(r"</?[a-z]+>|\S")


class ArithmeticTokenizer:
    """Characters and RLCR tags <-> ids (0 pad, 1 bos, 2 eos, symbols from 3); whitespace is dropped."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self):
        self._symbols = SymbolTokenizer(SYMBOLS)

    @property
    def vocab_size(self) -> int:
        return self._symbols.vocab_size

    def encode(self, text: str) -> list[int]:
        """Ids of the tags and non-space characters of ``text`` (an unknown character is an error)."""
        return self._symbols.ids_of(_PIECES.findall(text)).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` without pad/bos/eos and without separators."""
        return self._symbols.decode(ids).replace(" ", "")


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    """``first + second`` where each operand is a set of candidate digits; ``hidden`` is the true pair."""

    first: tuple[int, ...]
    second: tuple[int, ...]
    hidden: tuple[int, int]

    @property
    def gold(self) -> str:
        return str(sum(self.hidden))

    @property
    def prompt(self) -> str:
        """E.g. ``3+{147}=``: a set of one digit is written as the digit itself."""
        return f"{_operand_text(self.first)}+{_operand_text(self.second)}="

    def answer_probabilities(self) -> dict[str, float]:
        """``q*(s) = #{(a, b): a + b = s} / (|A| |B|)`` for every consistent answer s."""
        counts = collections.Counter(a + b for a in self.first for b in self.second)
        total = len(self.first) * len(self.second)
        return {str(s): count / total for s, count in counts.items()}

    def optimal_confidence(self, answer: str | None) -> float:
        """``q*(answer)``: the probability that ``answer`` is right (0 for an inconsistent or missing answer)."""
        return 0.0 if answer is None else self.answer_probabilities().get(answer.strip(), 0.0)

    def best_accuracy(self) -> float:
        """``max_s q*(s)``: the accuracy of the best possible answer."""
        return max(self.answer_probabilities().values())


def _operand_text(digits: tuple[int, ...]) -> str:
    return str(digits[0]) if len(digits) == 1 else "{" + "".join(map(str, digits)) + "}"


def sample_problem(rng: np.random.Generator, split: str = "train") -> ArithmeticProblem:
    """One problem of ``split``: set sizes from ``SPLITS[split]`` (order of the operands random)."""
    require(split in SPLITS, "split", split, f"one of {tuple(SPLITS)}")
    sizes = [int(rng.choice(options)) for options in SPLITS[split]]
    if rng.random() < 0.5:
        sizes.reverse()
    first, second = (tuple(sorted(rng.choice(10, size=k, replace=False).tolist())) for k in sizes)
    hidden = (int(rng.choice(first)), int(rng.choice(second)))
    return ArithmeticProblem(first=first, second=second, hidden=hidden)


def format_completion(answer: str, confidence: float, analysis: str = "") -> str:
    """``<answer>a</answer><analysis>…</analysis><confidence>q</confidence>`` with q to two decimals."""
    return f"<answer>{answer}</answer><analysis>{analysis}</analysis><confidence>{confidence:.2f}</confidence>"


def prompt_tokens(problem: ArithmeticProblem, tokenizer: ArithmeticTokenizer) -> list[int]:
    """``<bos>`` then the prompt's characters."""
    return [tokenizer.bos_id] + tokenizer.encode(problem.prompt)


def format_warmup_example(problem: ArithmeticProblem, tokenizer: ArithmeticTokenizer,
                          rng: np.random.Generator) -> tuple[list[int], list[bool]]:
    """An SFT ``(tokens, learn)`` pair that teaches the format and not the confidence.

    The answer is the sum of a uniformly drawn consistent pair (as likely right as the gold pair); the
    confidence is uniform on [0, 1], independent of the problem, so the warm-up carries no information
    about how likely the answer is. Only the completion (and its ``<eos>``) is learned.
    """
    a, b = int(rng.choice(problem.first)), int(rng.choice(problem.second))
    completion = tokenizer.encode(format_completion(str(a + b), float(rng.random()))) + [tokenizer.eos_id]
    prompt = prompt_tokens(problem, tokenizer)
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)
