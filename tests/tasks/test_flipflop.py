"""Flip-flop structure: first write, last read, instruction densities, presets."""

import dataclasses

import numpy as np
import pytest

from jaxlm.data import DataConfig
from jaxlm.errors import ConfigError
from jaxlm.tasks import FLIPFLOP_PRESETS, TaskSource, flipflop_preset, task_from_config


def test_first_instruction_writes_and_last_reads():
    task = task_from_config(DataConfig(source="flipflop", seq_len=22))
    for index in range(50):
        words = task.tokenizer.decode(TaskSource(task, 0, 0)[index][0]).split()
        assert len(words) == 22  # 11 instructions; the 23rd token is padding
        assert words[0] == "w" and words[-2] == "r"
        assert set(words[0::2]) <= {"w", "r", "i"} and set(words[1::2]) <= {"0", "1"}


@pytest.mark.parametrize("name", sorted(FLIPFLOP_PRESETS))
def test_instruction_frequencies_follow_the_preset(name):
    config = dataclasses.replace(DataConfig(source="flipflop", seq_len=401), **flipflop_preset(name))
    task = task_from_config(config)
    instructions = np.concatenate([TaskSource(task, 4, 0)[i][0][2:-2:2] for i in range(60)])  # interior only
    counts = {s: np.mean(instructions == task.tokenizer.id_of(s)) for s in "wri"}
    p_ignore = FLIPFLOP_PRESETS[name]
    assert abs(counts["i"] - p_ignore) < 0.02
    assert abs(counts["w"] - (1 - p_ignore) / 2) < 0.02 and abs(counts["r"] - (1 - p_ignore) / 2) < 0.02


def test_flipflop_answers_reads_a_handwritten_sequence():
    task = task_from_config(DataConfig(source="flipflop", seq_len=13))
    ids = np.array(task.tokenizer.encode("w 1 i 0 r 1 w 0 i 1 r 0 r 0"), dtype=np.int32)
    one, zero = task.tokenizer.id_of("1"), task.tokenizer.id_of("0")
    expected = np.full(14, -1)
    expected[[5, 11, 13]] = [one, zero, zero]
    np.testing.assert_array_equal(task.answers(ids), expected)


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="sparse"):
        flipflop_preset("medium")
