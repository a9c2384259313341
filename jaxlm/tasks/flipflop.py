"""Flip-flop language modelling (Liu et al. 2023, "Exposing Attention Glitches with Flip-Flop
Language Modeling", Sec. 2).

A sequence is instruction/bit pairs: ``w x`` writes bit x, ``i x`` is ignored, ``r x`` reads, and
its bit x must equal the most recent written bit:

    w 1  i 0  i 1  r 1  w 0  i 1  r 0

The first instruction is a write and the last one a read; the others are drawn i.i.d. with
probabilities ``(p_write, p_read, p_ignore)``; written and ignored bits are uniform. The scored
tokens are the bits after each ``r``. A sequence holds ``(seq_len + 1) // 2`` instructions
(right-padded by one token when ``seq_len + 1`` is odd).

Named settings of the paper, FFL(p) with ``p_ignore = p`` and ``p_write = p_read = (1 - p) / 2``
(``flipflop_preset(name)`` returns the DataConfig fields):

- ``"train"``: p = 0.8, the training distribution;
- ``"sparse"``: p = 0.98, out-of-distribution with long gaps between writes and reads;
- ``"dense"``: p = 0.1, out-of-distribution with many writes and reads.
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

WRITE, READ, IGNORE = "w", "r", "i"
FLIPFLOP_PRESETS = {"train": 0.8, "sparse": 0.98, "dense": 0.1}  # name -> p_ignore


def flipflop_preset(name: str) -> dict[str, float]:
    """DataConfig fields of a named FFL(p) setting: p_ignore = p, p_write = p_read = (1 - p) / 2."""
    require(name in FLIPFLOP_PRESETS, "flipflop preset", name, f"one of {tuple(FLIPFLOP_PRESETS)}")
    p_ignore = FLIPFLOP_PRESETS[name]
    p_other = (1.0 - p_ignore) / 2
    return {"flipflop_p_write": p_other, "flipflop_p_read": p_other, "flipflop_p_ignore": p_ignore}


def check_config(config: DataConfig) -> None:
    """Raise ConfigError naming the first flip-flop field that is out of range or does not fit ``seq_len``."""
    names = ("flipflop_p_write", "flipflop_p_read", "flipflop_p_ignore")
    for name in names:
        value = getattr(config, name)
        require(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"data.{name}", value,
                "a probability in [0, 1]")
    total = sum(getattr(config, name) for name in names)
    require(abs(total - 1.0) < 1e-6, "data.flipflop_p_ignore", config.flipflop_p_ignore,
            f"a value making data.flipflop_p_write + data.flipflop_p_read + data.flipflop_p_ignore = 1 "
            f"(they sum to {total})")
    require(config.seq_len >= 3, "data.seq_len", config.seq_len,
            "at least 3 for flip-flop (one write and one read take 4 = seq_len + 1 tokens)")


@dataclasses.dataclass(frozen=True)
class FlipFlopTask:
    """Flip-flop examples of ``seq_len + 1`` tokens (inputs and next-token targets of length ``seq_len``)."""

    seq_len: int
    p_write: float
    p_read: float
    p_ignore: float

    @classmethod
    def from_config(cls, config: DataConfig) -> FlipFlopTask:
        check_config(config)
        return cls(config.seq_len, config.flipflop_p_write, config.flipflop_p_read, config.flipflop_p_ignore)

    @functools.cached_property
    def tokenizer(self) -> SymbolTokenizer:
        """Symbols ``w r i 0 1``."""
        return SymbolTokenizer([WRITE, READ, IGNORE, "0", "1"])

    @property
    def num_instructions(self) -> int:
        return (self.seq_len + 1) // 2

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One example: (token ids [seq_len + 1] int32, answer mask [seq_len + 1] bool)."""
        count = self.num_instructions
        probabilities = np.array([self.p_write, self.p_read, self.p_ignore]) / (self.p_write + self.p_read + self.p_ignore)
        kinds = rng.choice(3, size=count, p=probabilities)  # [N] 0 write, 1 read, 2 ignore
        kinds[0], kinds[-1] = 0, 1
        bits = rng.integers(0, 2, size=count)  # [N]
        is_write = kinds == 0
        last_write = np.maximum.accumulate(np.where(is_write, np.arange(count), 0))  # [N] index of latest write
        is_read = kinds == 1
        bits[is_read] = bits[last_write[is_read]]
        instruction_ids = self.tokenizer.ids_of([WRITE, READ, IGNORE])[kinds]  # [N]
        bit_ids = self.tokenizer.ids_of(["0", "1"])[bits]  # [N]
        sequence = np.stack([instruction_ids, bit_ids], axis=1).reshape(-1)  # [2 N] instr bit instr bit ...
        answer_mask = np.stack([np.zeros(count, dtype=bool), is_read], axis=1).reshape(-1)  # [2 N]
        return pad_to_length(sequence, answer_mask, self.seq_len + 1)

    def answers(self, sequence: np.ndarray) -> np.ndarray:
        """Exact check: the expected token at every position, recomputed from the tokens alone.

        Walks the instruction/bit pairs up to the first padding token, remembering the last bit
        written; a read's bit must be that bit. Returns an int32 array like ``sequence`` holding
        the expected bit id after every read and -1 elsewhere.
        """
        write_id, read_id = self.tokenizer.id_of(WRITE), self.tokenizer.id_of(READ)
        expected = np.full(len(sequence), -1, dtype=np.int32)
        last_written = None
        for position in range(0, len(sequence) - 1, 2):
            instruction, bit = int(sequence[position]), int(sequence[position + 1])
            if instruction == self.tokenizer.pad_id:
                break
            if instruction == write_id:
                last_written = bit
            elif instruction == read_id and last_written is not None:
                expected[position + 1] = last_written
        return expected
