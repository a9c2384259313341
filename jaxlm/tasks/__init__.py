"""Synthetic language-modelling tasks, each a seeded random-access grain source.

A task has ``tokenizer`` (its symbolic vocabulary), ``sample(rng) -> (ids [T+1], answer_mask [T+1])``
and ``answers(ids) -> expected [T+1]`` (the exact check: -1 where nothing is scored).
``TaskSource`` makes example ``i`` of a stream a pure function of ``(seed, stream, i)``, so any
host can generate any index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from jaxlm.errors import require
from jaxlm.tasks import copy, flipflop, mqar
from jaxlm.tasks.copy import CopyTask
from jaxlm.tasks.flipflop import FLIPFLOP_PRESETS, FlipFlopTask, flipflop_preset
from jaxlm.tasks.mqar import MQARTask
from jaxlm.tasks.symbols import SymbolTokenizer

if TYPE_CHECKING:
    from jaxlm.data.config import DataConfig

SYNTHETIC_TASKS = {"mqar": MQARTask, "copy": CopyTask, "flipflop": FlipFlopTask}
_CONFIG_CHECKS = {"mqar": mqar.check_config, "copy": copy.check_config, "flipflop": flipflop.check_config}
NUM_EXAMPLES_PER_STREAM = 2**62  # effectively infinite; examples are generated on demand
TRAIN_STREAM, EVAL_STREAM = 0, 1


class Task(Protocol):
    """What the data pipeline needs from a synthetic task."""

    seq_len: int
    tokenizer: SymbolTokenizer

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...

    def answers(self, sequence: np.ndarray) -> np.ndarray: ...


def check_task_config(config: DataConfig) -> None:
    """Raise ConfigError naming the first bad field of the synthetic task ``config.source``."""
    require(config.source in SYNTHETIC_TASKS, "data.source", config.source,
            f"a synthetic task, one of {tuple(SYNTHETIC_TASKS)}")
    _CONFIG_CHECKS[config.source](config)


def task_from_config(config: DataConfig) -> Task:
    """The task object of ``config.source`` with its fields from ``config`` (validated)."""
    check_task_config(config)
    return SYNTHETIC_TASKS[config.source].from_config(config)


class TaskSource:
    """Random-access grain source: item ``i`` is ``task.sample(default_rng([seed, stream, i]))``.

    Distinct ``stream`` values (``TRAIN_STREAM``, ``EVAL_STREAM``) give disjoint random streams.
    Items are ``(ids [T+1] int32, answer_mask [T+1] bool)``.
    """

    def __init__(self, task: Task, seed: int, stream: int):
        self.task, self.seed, self.stream = task, seed, stream

    def __len__(self) -> int:
        return NUM_EXAMPLES_PER_STREAM

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.task.sample(np.random.default_rng([self.seed, self.stream, int(index)]))


__all__ = [
    "FLIPFLOP_PRESETS", "SYNTHETIC_TASKS", "TRAIN_STREAM", "EVAL_STREAM", "CopyTask", "FlipFlopTask",
    "MQARTask", "SymbolTokenizer", "Task", "TaskSource", "check_task_config", "flipflop_preset", "task_from_config",
]
