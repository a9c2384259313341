"""The data pipeline's configuration: a frozen dataclass, validated once at start-up."""

from __future__ import annotations

import dataclasses
import os

from jaxlm.errors import require

SYNTHETIC_SOURCES = ("mqar", "copy", "flipflop")
SOURCES = SYNTHETIC_SOURCES + ("text",)
BYTE_TOKENIZER = "byte"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are batched.

    ``batch_size`` is the GLOBAL batch over all hosts; each host yields ``batch_size //
    process_count`` rows. For ``source="text"``, ``path`` is a file or folder of .txt / .jsonl /
    .parquet files (see ``jaxlm.data.text``); without ``eval_path`` every
    ``round(1 / text_eval_fraction)``-th document is held out for evaluation. Task fields are
    prefixed by the task name (see ``jaxlm.tasks``).
    """

    source: str = "mqar"
    seq_len: int = 128
    batch_size: int = 32
    seed: int = 0
    # text
    path: str = ""
    eval_path: str = ""
    text_field: str = "text"
    text_eval_fraction: float = 0.05
    tokenizer: str = BYTE_TOKENIZER  # "byte" or a path to a tokenizer.json
    pack: bool = True
    # MQAR
    mqar_num_pairs: int = 8
    mqar_num_queries: int = 8
    mqar_num_keys: int = 64
    mqar_num_values: int = 64
    # copy
    copy_length: int = 16
    copy_num_symbols: int = 16
    # flip-flop: FFL(0.8), the training setting of Liu et al. 2023 (see jaxlm.tasks.flipflop_preset)
    flipflop_p_write: float = 0.1
    flipflop_p_read: float = 0.1
    flipflop_p_ignore: float = 0.8

    @property
    def is_synthetic(self) -> bool:
        return self.source in SYNTHETIC_SOURCES

    def validate(self) -> DataConfig:
        """Raise ConfigError naming the first bad field; return self when all are valid."""
        require(self.source in SOURCES, "data.source", self.source, f"one of {SOURCES}")
        for name in ("seq_len", "batch_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"data.{name}", value, "a positive integer")
        require(isinstance(self.seed, int) and self.seed >= 0, "data.seed", self.seed, "a non-negative integer")
        if self.is_synthetic:
            from jaxlm.tasks import check_task_config

            check_task_config(self)
        else:
            self._validate_text()
        return self

    def _validate_text(self) -> None:
        require(bool(self.path), "data.path", self.path, "a file or folder of .txt/.jsonl/.parquet files when data.source='text'")
        require(os.path.exists(self.path), "data.path", self.path, "an existing file or folder")
        require(not self.eval_path or os.path.exists(self.eval_path), "data.eval_path", self.eval_path,
                "empty (hold out part of data.path) or an existing file or folder")
        require(bool(self.text_field), "data.text_field", self.text_field, "a non-empty field / column name")
        require(self.tokenizer == BYTE_TOKENIZER or os.path.isfile(self.tokenizer), "data.tokenizer", self.tokenizer,
                f"{BYTE_TOKENIZER!r} or the path of an existing tokenizer.json file")
        require(bool(self.eval_path) or 0.0 < self.text_eval_fraction <= 0.5, "data.text_eval_fraction",
                self.text_eval_fraction, "a fraction in (0, 0.5] when data.eval_path is empty")


def required_vocab_size(config: DataConfig) -> int:
    """The smallest model vocabulary that covers every token id this data can produce."""
    from jaxlm.data.tokenizers import tokenizer_for

    return tokenizer_for(config).vocab_size


def per_host_batch_size(config: DataConfig, process_count: int) -> int:
    """``batch_size // process_count``; a ConfigError when the global batch does not split evenly."""
    require(isinstance(process_count, int) and process_count > 0, "process_count", process_count, "a positive integer")
    require(config.batch_size % process_count == 0, "data.batch_size", config.batch_size,
            f"a multiple of the number of processes ({process_count}): it is the global batch over all hosts")
    return config.batch_size // process_count
