"""Copy: a random string, a separator, then the same string again.

    c3 c0 c7 c7 c1 | c3 c0 c7 c7 c1

The scored tokens are the copy after ``|``: the model must reproduce a string it saw once, which
needs memory linear in its length (Jelassi et al. 2024, "Repeat After Me"). Symbols are drawn
uniformly with replacement; the sequence is right-padded to ``seq_len + 1`` tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import numpy as np

from jaxlm.errors import require
from jaxlm.tasks.symbols import SymbolTokenizer, pad_to_length

if TYPE_CHECKING:
    from jaxlm.data.config import DataConfig

SEPARATOR = "|"


def check_config(config: DataConfig) -> None:
    """Raise ConfigError naming the first copy field that is out of range or does not fit ``seq_len``."""
    for name in ("copy_length", "copy_num_symbols"):
        value = getattr(config, name)
        require(isinstance(value, int) and value > 0, f"data.{name}", value, "a positive integer")
    needed = 2 * config.copy_length + 1
    require(needed <= config.seq_len + 1, "data.seq_len", config.seq_len,
            f"at least 2 * data.copy_length = {needed - 1} for the copy task (copy_length={config.copy_length})")


@dataclasses.dataclass(frozen=True)
class CopyTask:
    """Copy examples of ``seq_len + 1`` tokens (inputs and next-token targets of length ``seq_len``)."""

    seq_len: int
    length: int
    num_symbols: int

    @classmethod
    def from_config(cls, config: DataConfig) -> CopyTask:
        check_config(config)
        return cls(config.seq_len, config.copy_length, config.copy_num_symbols)

    @functools.cached_property
    def tokenizer(self) -> SymbolTokenizer:
        """Symbols ``c0 .. c{num_symbols-1}`` then the separator ``|``."""
        return SymbolTokenizer([f"c{i}" for i in range(self.num_symbols)] + [SEPARATOR])

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One example: (token ids [seq_len + 1] int32, answer mask [seq_len + 1] bool)."""
        first_symbol = self.tokenizer.id_of("c0")
        string = rng.integers(0, self.num_symbols, size=self.length) + first_symbol  # [L]
        separator = [self.tokenizer.id_of(SEPARATOR)]
        sequence = np.concatenate([string, separator, string]).astype(np.int32)  # [2 L + 1]
        answer_mask = np.zeros(len(sequence), dtype=bool)
        answer_mask[self.length + 1 :] = True  # the copy
        return pad_to_length(sequence, answer_mask, self.seq_len + 1)

    def answers(self, sequence: np.ndarray) -> np.ndarray:
        """Exact check: the expected token at every position, recomputed from the tokens alone.

        Finds the first separator; the tokens before it are the string, and the ``len(string)``
        positions after it must repeat it. Returns an int32 array like ``sequence`` holding the
        expected id at the copy positions and -1 elsewhere.
        """
        expected = np.full(len(sequence), -1, dtype=np.int32)
        separators = np.flatnonzero(np.asarray(sequence) == self.tokenizer.id_of(SEPARATOR))
        if len(separators) == 0:
            return expected
        string = np.asarray(sequence[: separators[0]])
        copy_end = min(len(sequence), 2 * len(string) + 1)
        expected[separators[0] + 1 : copy_end] = string[: copy_end - separators[0] - 1]
        return expected
