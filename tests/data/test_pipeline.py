"""grain pipelines: batch layout, determinism, host shards, resumable state, evaluation sets."""

import dataclasses
import itertools
import json

import numpy as np
import pytest

from jaxlm.data import BATCH_KEYS, ByteTokenizer, DataConfig, make_eval_batches, make_train_iterator
from jaxlm.data.text import read_documents, split_held_out

SYNTHETIC = [
    DataConfig(source="mqar", seq_len=37, batch_size=6, mqar_num_pairs=5, mqar_num_queries=4, mqar_num_keys=20),
    DataConfig(source="copy", seq_len=21, batch_size=6, copy_length=7, seed=4),
    DataConfig(source="flipflop", seq_len=30, batch_size=6, seed=2),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of .txt documents of varied lengths (never exactly seq_len + 1 bytes with EOS)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "γάμμα", "delta", "ε", "zeta!", "eta?"]
    documents = [" ".join(rng.choice(words, size=rng.integers(1, 25))) + f" #{i}" for i in range(60)]
    (folder / "part1.txt").write_text("\n\n".join(documents[:30]))
    (folder / "part2.txt").write_text("\n\n".join(documents[30:]))
    return folder


def _text_config(corpus, **overrides):
    return dataclasses.replace(DataConfig(source="text", path=str(corpus), seq_len=45, batch_size=4,
                                          text_eval_fraction=0.1), **overrides)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def _all_configs(corpus):
    return SYNTHETIC + [_text_config(corpus), _text_config(corpus, pack=False)]


def test_batch_layout(corpus):
    for config in _all_configs(corpus):
        batch = next(make_train_iterator(config, process_index=0, process_count=2))
        shape = (config.batch_size // 2, config.seq_len)
        assert sorted(batch) == sorted(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert batch[key].shape == shape
            assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
        np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
        assert batch["loss_mask"].sum() > 0 and set(np.unique(batch["loss_mask"])) <= {0.0, 1.0}
        if config.is_synthetic:
            assert batch["loss_mask"].sum() < batch["loss_mask"].size  # only the answers


def test_synthetic_loss_mask_marks_the_answers():
    from jaxlm.tasks import task_from_config

    for config in SYNTHETIC:
        task = task_from_config(config)
        batch = next(make_train_iterator(config, process_index=0, process_count=1))
        for tokens, targets, loss_mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"]):
            window = np.append(tokens, targets[-1])
            expected = task.answers(window)[1:]
            np.testing.assert_array_equal(loss_mask, expected >= 0)
            np.testing.assert_array_equal(targets[loss_mask > 0], expected[loss_mask > 0])


def test_deterministic_given_seed_and_different_across_seeds(corpus):
    for config in _all_configs(corpus):
        first = _take(make_train_iterator(config, process_index=0, process_count=1), 3)
        _assert_batches_equal(first, _take(make_train_iterator(config, process_index=0, process_count=1), 3))
        other = _take(make_train_iterator(dataclasses.replace(config, seed=config.seed + 1),
                                          process_index=0, process_count=1), 3)
        assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


def test_host_shards_are_disjoint_and_together_the_single_host_stream(corpus):
    for config in _all_configs(corpus):
        single = _take(make_train_iterator(config, process_index=0, process_count=1), 4)
        hosts = [_take(make_train_iterator(config, process_index=p, process_count=2), 4) for p in range(2)]
        for step, batch in enumerate(single):
            for key in BATCH_KEYS:
                joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
                np.testing.assert_array_equal(joined, batch[key])
            rows = [tuple(row) for host in hosts for row in host[step]["tokens"]]
            assert len(set(rows)) == len(rows)


def test_state_resumes_the_exact_batches(corpus):
    for config in _all_configs(corpus):
        iterator = make_train_iterator(config, process_index=1, process_count=2)
        _take(iterator, 5)
        state = json.loads(json.dumps(iterator.get_state()))
        expected = _take(iterator, 3)
        resumed = make_train_iterator(config, process_index=1, process_count=2)
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 3), expected)


def _decoded_documents(batches):
    """Concatenate the real tokens of all rows in order and cut at EOS."""
    tokenizer = ByteTokenizer()
    stream = np.concatenate([np.append(row_tokens[row_segments > 0], row_targets[-1] if row_segments[-1] > 0 else [])
                             for batch in batches
                             for row_tokens, row_targets, row_segments in zip(batch["tokens"], batch["targets"],
                                                                              batch["segment_ids"])]).astype(int)
    pieces = np.split(stream, np.flatnonzero(stream == tokenizer.eos_id) + 1)
    return [tokenizer.decode(piece) for piece in pieces if len(piece) and piece[-1] == tokenizer.eos_id]


def _first_epoch_documents(config, train, epochs=1):
    """The documents decoded from the first ``epochs`` epochs' worth of training batches."""
    epoch_tokens = epochs * sum(len(doc.encode("utf-8")) + 1 for doc in train)
    num_batches = -(-epoch_tokens // ((config.seq_len + 1) * config.batch_size))
    # windows are seq_len + 1 tokens; the batch's targets carry each window's last token
    batches = _take(make_train_iterator(config, process_index=0, process_count=1), num_batches)
    return _decoded_documents(batches)[: epochs * len(train)]


def test_every_epoch_holds_every_training_document_once(corpus):
    train, held_out = split_held_out(read_documents(str(corpus)), 0.1)
    documents = _first_epoch_documents(_text_config(corpus), train, epochs=2)
    first, second = documents[: len(train)], documents[len(train):]
    assert sorted(first) == sorted(second) == sorted(train)
    assert first != train and second != first  # shuffled, afresh every epoch
    assert not set(documents) & set(held_out)


def test_synthetic_eval_is_fixed_and_disjoint_from_training():
    for config in SYNTHETIC:
        evaluation = make_eval_batches(config, 3, process_index=0, process_count=1)
        assert len(evaluation) == 3
        _assert_batches_equal(evaluation, make_eval_batches(config, 3, process_index=0, process_count=1))
        train_rows = {tuple(row) for batch in _take(make_train_iterator(config, process_index=0, process_count=1), 3)
                      for row in batch["tokens"]}
        assert not any(tuple(row) in train_rows for batch in evaluation for row in batch["tokens"])
        hosts = [make_eval_batches(config, 3, process_index=p, process_count=3) for p in range(3)]
        for step in range(3):
            joined = np.concatenate([hosts[p][step]["tokens"] for p in range(3)])
            np.testing.assert_array_equal(joined, evaluation[step]["tokens"])


def test_text_eval_is_the_held_out_documents_padded_at_the_end(corpus):
    config = _text_config(corpus)
    _, held_out = split_held_out(read_documents(str(corpus)), 0.1)
    evaluation = make_eval_batches(config, 50, process_index=0, process_count=1)
    assert 0 < len(evaluation) < 50  # the held-out documents run out
    assert _decoded_documents(evaluation) == held_out  # in order, nothing lost
    assert (evaluation[-1]["loss_mask"][-1] == 0).all() and (evaluation[-1]["segment_ids"][-1] == 0).all()
    halves = [make_eval_batches(config, 50, process_index=p, process_count=2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([halves[0][0]["tokens"], halves[1][0]["tokens"]]),
                                  evaluation[0]["tokens"])


def test_eval_path_replaces_the_held_out_split(corpus, tmp_path):
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["held one", "held two"]))
    config = _text_config(corpus, eval_path=str(tmp_path / "eval.jsonl"))
    assert _decoded_documents(make_eval_batches(config, 4, process_index=0, process_count=1)) == ["held one", "held two"]
    everything = read_documents(str(corpus))  # nothing of data.path is held out now
    assert sorted(_first_epoch_documents(config, everything)) == sorted(everything)


def test_seed_stream_is_infinite():
    config = SYNTHETIC[2]
    iterator = make_train_iterator(config, process_index=0, process_count=1)
    batches = list(itertools.islice(iterator, 20))
    assert len({batch["tokens"].tobytes() for batch in batches}) == 20
