"""Copy structure: string, separator, the same string; the copy is scored."""

import numpy as np

from jaxlm.data import DataConfig
from jaxlm.tasks import TaskSource, task_from_config

CONFIG = DataConfig(source="copy", seq_len=26, copy_length=9, copy_num_symbols=5)


def test_copy_layout_against_symbolic_reading():
    task = task_from_config(CONFIG)
    seen_symbols = set()
    for index in range(100):
        ids, answer_mask = TaskSource(task, 2, 0)[index]
        words = task.tokenizer.decode(ids).split()
        assert words[9] == "|" and words[:9] == words[10:] and len(words) == 19
        seen_symbols.update(words[:9])
        np.testing.assert_array_equal(np.flatnonzero(answer_mask), np.arange(10, 19))
    assert seen_symbols == {f"c{i}" for i in range(5)}


def test_copy_answers_reads_a_handwritten_sequence():
    task = task_from_config(CONFIG)
    ids = np.array(task.tokenizer.encode("c1 c4 | c1 c0") + [0], dtype=np.int32)
    np.testing.assert_array_equal(task.answers(ids), [-1, -1, -1, ids[0], ids[1], -1])
