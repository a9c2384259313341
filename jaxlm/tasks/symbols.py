"""Building blocks shared by the synthetic tasks: a symbolic vocabulary and fixed-length sequences.

Every synthetic task speaks a small vocabulary of readable symbols (``k12``, ``v7``, ``w``, ``0``,
``|``, ...) so a person can type a prompt and read the model's answer. Ids follow the same layout
as the byte tokenizer: 0 is padding, 1 begin-of-sequence, 2 end-of-sequence, the task's symbols
from 3 on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


class SymbolTokenizer:
    """Whitespace-separated symbols <-> ids; ids 0..2 are the special tokens, symbols start at 3."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, symbols: Sequence[str]):
        self.symbols = tuple(symbols)
        tokens = SPECIAL_TOKENS + self.symbols
        if len(set(tokens)) != len(tokens) or any(not s or s.split() != [s] for s in self.symbols):
            raise ValueError(f"symbols must be distinct, non-empty and free of whitespace; got {self.symbols}")
        self._id_of = {token: i for i, token in enumerate(tokens)}
        self._tokens = tokens

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def id_of(self, symbol: str) -> int:
        """The id of one symbol (or special token)."""
        if symbol not in self._id_of:
            raise ValueError(f"unknown symbol {symbol!r}; this task knows {self._tokens}")
        return self._id_of[symbol]

    def ids_of(self, symbols: Sequence[str]) -> np.ndarray:
        """Ids of several symbols, as an int32 array."""
        return np.array([self.id_of(s) for s in symbols], dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        """Split ``text`` on whitespace and map every symbol to its id (unknown symbols are an error)."""
        return [self.id_of(symbol) for symbol in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Join the symbols of ``ids`` with spaces, leaving out pad/bos/eos."""
        words = []
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside this task's vocabulary [0, {self.vocab_size})")
            if token_id >= len(SPECIAL_TOKENS):
                words.append(self._tokens[token_id])
        return " ".join(words)


def pad_to_length(sequence: np.ndarray, answer_mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a task sequence with ``PAD_ID`` (and its answer mask with False) to ``length``."""
    if len(sequence) > length:
        raise ValueError(f"task sequence of length {len(sequence)} does not fit in {length} tokens")
    padded = np.full(length, PAD_ID, dtype=np.int32)  # [L]
    padded[: len(sequence)] = sequence
    padded_mask = np.zeros(length, dtype=bool)  # [L]
    padded_mask[: len(answer_mask)] = answer_mask
    return padded, padded_mask
