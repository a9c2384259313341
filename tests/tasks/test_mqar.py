"""MQAR structure: distinct keys, queries of stored keys, answers are the stored values."""

import numpy as np

from jaxlm.data import DataConfig
from jaxlm.tasks import TaskSource, task_from_config

CONFIG = DataConfig(source="mqar", seq_len=37, mqar_num_pairs=6, mqar_num_queries=5, mqar_num_keys=9,
                    mqar_num_values=4)


def test_mqar_layout_against_symbolic_reading():
    task = task_from_config(CONFIG)
    for index in range(100):
        ids, answer_mask = TaskSource(task, 11, 0)[index]
        words = task.tokenizer.decode(ids).split()
        assert len(words) == 2 * (6 + 5)
        pairs = list(zip(words[0::2], words[1::2]))
        assert all(k.startswith("k") and v.startswith("v") for k, v in pairs)
        stored, queries = dict(pairs[:6]), pairs[6:]
        assert len(stored) == 6  # distinct keys
        assert len({k for k, _ in queries}) == 5  # each stored key queried at most once
        assert all(stored[k] == v for k, v in queries)
        np.testing.assert_array_equal(np.flatnonzero(answer_mask), 2 * 6 + 1 + 2 * np.arange(5))
        assert (ids[2 * 11 :] == 0).all()


def test_mqar_answers_reads_a_handwritten_sequence():
    task = task_from_config(CONFIG)
    text = "k3 v1 k0 v2 k8 v1 k0 v2 k3 v1"
    ids = np.array(task.tokenizer.encode(text) + [0, 0], dtype=np.int32)
    expected = task.answers(ids)
    v2, v1 = task.tokenizer.id_of("v2"), task.tokenizer.id_of("v1")
    np.testing.assert_array_equal(expected, [-1, -1, -1, -1, -1, -1, -1, v2, -1, v1, -1, -1])
