"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", Sec. 3).

A sequence is ``num_pairs`` key-value pairs with distinct keys, followed by ``num_queries``
queries, each an earlier key (distinct queried keys, random order) followed by its value:

    k12 v7  k3 v7  k40 v1 ... | k3 v7  k12 v7 ...
    `------- pairs --------'    `--- queries ---'

The scored tokens are the values of the queries: predicting ``v`` after query key ``k`` requires
recalling the pair ``(k, v)``. Values are drawn with replacement. The sequence is right-padded to
``seq_len + 1`` tokens.
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


def mqar_tokens_needed(num_pairs: int, num_queries: int) -> int:
    """Length of an MQAR sequence: two tokens per pair and two per query, 2 * (pairs + queries)."""
    return 2 * (num_pairs + num_queries)


def check_config(config: DataConfig) -> None:
    """Raise ConfigError naming the first MQAR field that is out of range or does not fit ``seq_len``."""
    for name in ("mqar_num_pairs", "mqar_num_queries", "mqar_num_keys", "mqar_num_values"):
        value = getattr(config, name)
        require(isinstance(value, int) and value > 0, f"data.{name}", value, "a positive integer")
    require(config.mqar_num_pairs <= config.mqar_num_keys, "data.mqar_num_pairs", config.mqar_num_pairs,
            f"at most data.mqar_num_keys={config.mqar_num_keys} (keys are distinct within an example)")
    require(config.mqar_num_queries <= config.mqar_num_pairs, "data.mqar_num_queries", config.mqar_num_queries,
            f"at most data.mqar_num_pairs={config.mqar_num_pairs} (each stored key is queried at most once)")
    needed = mqar_tokens_needed(config.mqar_num_pairs, config.mqar_num_queries)
    require(needed <= config.seq_len + 1, "data.seq_len", config.seq_len,
            f"at least 2 * (data.mqar_num_pairs + data.mqar_num_queries) - 1 = {needed - 1} for MQAR "
            f"(num_pairs={config.mqar_num_pairs}, num_queries={config.mqar_num_queries})")


@dataclasses.dataclass(frozen=True)
class MQARTask:
    """MQAR examples of ``seq_len + 1`` tokens (inputs and next-token targets of length ``seq_len``)."""

    seq_len: int
    num_pairs: int
    num_queries: int
    num_keys: int
    num_values: int

    @classmethod
    def from_config(cls, config: DataConfig) -> MQARTask:
        check_config(config)
        return cls(config.seq_len, config.mqar_num_pairs, config.mqar_num_queries, config.mqar_num_keys,
                   config.mqar_num_values)

    @functools.cached_property
    def tokenizer(self) -> SymbolTokenizer:
        """Symbols ``k0 .. k{num_keys-1}`` then ``v0 .. v{num_values-1}``."""
        keys = [f"k{i}" for i in range(self.num_keys)]
        values = [f"v{i}" for i in range(self.num_values)]
        return SymbolTokenizer(keys + values)

    @property
    def first_key_id(self) -> int:
        return self.tokenizer.id_of("k0")

    @property
    def first_value_id(self) -> int:
        return self.tokenizer.id_of("v0")

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One example: (token ids [seq_len + 1] int32, answer mask [seq_len + 1] bool)."""
        keys = rng.choice(self.num_keys, size=self.num_pairs, replace=False)  # [P] distinct
        values = rng.integers(0, self.num_values, size=self.num_pairs)  # [P]
        queried = rng.choice(self.num_pairs, size=self.num_queries, replace=False)  # [Q] pair indices
        pair_keys = np.concatenate([keys, keys[queried]]) + self.first_key_id  # [P + Q]
        pair_values = np.concatenate([values, values[queried]]) + self.first_value_id  # [P + Q]
        sequence = np.stack([pair_keys, pair_values], axis=1).reshape(-1)  # [2 (P + Q)] k v k v ...
        answer_mask = np.zeros_like(sequence, dtype=bool)
        answer_mask[2 * self.num_pairs + 1 :: 2] = True  # the value of every query
        return pad_to_length(sequence, answer_mask, self.seq_len + 1)

    def answers(self, sequence: np.ndarray) -> np.ndarray:
        """Exact check: the expected token at every position, recomputed from the tokens alone.

        Reads the sequence as ``key value`` pairs up to the first padding token; a key seen before
        is a query whose answer is the value stored with its first occurrence. Returns an int32
        array like ``sequence`` holding the answer id at query-value positions and -1 elsewhere.
        """
        expected = np.full(len(sequence), -1, dtype=np.int32)
        stored: dict[int, int] = {}
        for position in range(0, len(sequence) - 1, 2):
            key, value = int(sequence[position]), int(sequence[position + 1])
            if key == self.tokenizer.pad_id:
                break
            if key in stored:
                expected[position + 1] = stored[key]
            else:
                stored[key] = value
        return expected
