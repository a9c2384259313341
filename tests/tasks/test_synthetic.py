"""Shared checks of every synthetic task: the exact answer check agrees with the generated answers."""

import dataclasses

import numpy as np
import pytest

from jaxlm.data import DataConfig
from jaxlm.tasks import TaskSource, task_from_config

CONFIGS = [
    DataConfig(source="mqar", seq_len=45, mqar_num_pairs=9, mqar_num_queries=7, mqar_num_keys=13, mqar_num_values=5),
    DataConfig(source="copy", seq_len=30, copy_length=11, copy_num_symbols=3),
    DataConfig(source="flipflop", seq_len=50, flipflop_p_write=0.3, flipflop_p_read=0.3, flipflop_p_ignore=0.4),
    DataConfig(source="flipflop", seq_len=51),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.source}-{c.seq_len}")
def test_answer_mask_marks_exactly_the_recomputed_answers(config):
    task = task_from_config(config)
    source = TaskSource(task, seed=3, stream=0)
    for index in range(300):
        ids, answer_mask = source[index]
        assert ids.shape == answer_mask.shape == (config.seq_len + 1,)
        assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < task.tokenizer.vocab_size
        expected = task.answers(ids)
        np.testing.assert_array_equal(answer_mask, expected >= 0)
        np.testing.assert_array_equal(ids[answer_mask], expected[answer_mask])
        assert answer_mask.any()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.source}-{c.seq_len}")
def test_corrupting_an_answer_is_detected(config):
    task = task_from_config(config)
    ids, answer_mask = TaskSource(task, seed=1, stream=0)[7]
    position = np.flatnonzero(answer_mask)[-1]
    corrupted = ids.copy()
    corrupted[position] = ids[position] + 1 if ids[position] + 1 < task.tokenizer.vocab_size else ids[position] - 1
    assert task.answers(corrupted)[position] != corrupted[position]


@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: c.source)
def test_examples_are_pure_functions_of_seed_stream_and_index(config):
    task = task_from_config(config)
    first, again = TaskSource(task, 5, 0), TaskSource(task, 5, 0)
    np.testing.assert_array_equal(first[123][0], again[123][0])
    other_seed, other_stream = TaskSource(task, 6, 0), TaskSource(task, 5, 1)
    assert not np.array_equal(first[123][0], other_seed[123][0])
    assert not np.array_equal(first[123][0], other_stream[123][0])
    assert not np.array_equal(first[123][0], first[124][0])


@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: c.source)
def test_task_tokenizer_round_trips_an_example(config):
    task = task_from_config(config)
    ids, _ = TaskSource(task, 0, 0)[0]
    real = ids[ids != task.tokenizer.pad_id]
    assert task.tokenizer.encode(task.tokenizer.decode(ids)) == real.tolist()


def test_config_fields_reach_the_task():
    config = dataclasses.replace(CONFIGS[0], mqar_num_pairs=4, mqar_num_queries=2)
    ids, answer_mask = TaskSource(task_from_config(config), 0, 0)[0]
    assert answer_mask.sum() == 2
    assert (ids != 0).sum() == 2 * (4 + 2)
