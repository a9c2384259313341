"""Text files, the held-out split and packing, against simple python re-implementations."""

import json

import grain
import numpy as np
import pytest

from jaxlm.data.pipeline import text_example
from jaxlm.data.text import pack_windows, read_documents, split_held_out


def test_readers_for_all_three_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\n  second doc  \n \nthird ✓")
    with open(tmp_path / "b.jsonl", "w") as handle:
        for text in ["json one", "", "json two"]:
            handle.write(json.dumps({"body": text, "id": 3}) + "\n\n")
    pq.write_table(pa.table({"body": ["pq one", None, "pq two"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    (tmp_path / "skip.md").write_text("ignored")
    expected = ["first doc\nstill first", "second doc", "third ✓", "json one", "json two", "pq one", "pq two"]
    assert read_documents(str(tmp_path), "body") == expected
    assert read_documents(str(tmp_path / "c.parquet"), "body") == ["pq one", "pq two"]


def test_held_out_split_takes_every_kth_document():
    documents = [f"d{i}" for i in range(23)]
    train, held_out = split_held_out(documents, 0.2)
    assert held_out == ["d4", "d9", "d14", "d19"]
    assert sorted(train + held_out) == sorted(documents) and not set(train) & set(held_out)


def reference_concat_then_split(documents, length):
    """Lay documents end to end, cut every `length` tokens; each piece is a segment (positions from 0)."""
    windows, ids, segments, positions = [], [], [], []
    for document in documents:
        remaining = list(document)
        while remaining:
            piece, remaining = remaining[: length - len(ids)], remaining[length - len(ids):]
            segment = (segments[-1] if segments else 0) + 1
            ids += piece
            segments += [segment] * len(piece)
            positions += list(range(len(piece)))
            if len(ids) == length:
                windows.append((ids, segments, positions))
                ids, segments, positions = [], [], []
    if ids:
        pad = length - len(ids)
        windows.append((ids + [0] * pad, segments + [0] * pad, positions + [0] * pad))
    return windows


def _random_documents(rng, count, length, allow_exact_length):
    lengths = rng.integers(1, 3 * length, size=count)
    if not allow_exact_length:  # grain emits an exactly-full document ahead of a partly filled window
        lengths[lengths == length] += 1
    return [rng.integers(3, 200, size=n).astype(np.int32) for n in lengths]


def _pack(documents, length, pack):
    return list(pack_windows(grain.MapDataset.source(documents).to_iter_dataset(), length, pack))


def test_packing_matches_reference():
    rng = np.random.default_rng(0)
    length = 23
    documents = _random_documents(rng, 40, length, allow_exact_length=False)
    windows = _pack(documents, length, pack=True)
    reference = reference_concat_then_split(documents, length)
    assert len(windows) == len(reference)
    for window, (ids, segments, positions) in zip(windows, reference):
        np.testing.assert_array_equal(window["ids"], ids)
        np.testing.assert_array_equal(window["segment_ids"], segments)
        np.testing.assert_array_equal(window["positions"], positions)


@pytest.mark.parametrize("pack", [True, False])
def test_no_token_is_lost(pack):
    rng = np.random.default_rng(1)
    length = 17
    lengths = list(rng.integers(1, 60, size=30)) + [length, length, 2 * length]
    # token = 1000 * (document + 1) + offset identifies where every token came from
    documents = [1000 * (d + 1) + np.arange(n, dtype=np.int32) for d, n in enumerate(lengths)]
    seen = []
    for window in _pack(documents, length, pack):
        for segment in np.unique(window["segment_ids"][window["segment_ids"] > 0]):
            piece = window["ids"][window["segment_ids"] == segment]
            np.testing.assert_array_equal(np.diff(piece), 1)  # a contiguous piece of one document
            np.testing.assert_array_equal(window["positions"][window["segment_ids"] == segment], np.arange(len(piece)))
            seen += piece.tolist()
        assert (window["ids"][window["segment_ids"] == 0] == 0).all()
        if not pack:
            assert window["segment_ids"].max() == 1
    assert sorted(seen) == sorted(np.concatenate(documents).tolist())


def test_unpacked_documents_are_split_and_padded():
    documents = [np.arange(5, 12, dtype=np.int32), np.arange(20, 23, dtype=np.int32)]
    windows = _pack(documents, 4, pack=False)
    np.testing.assert_array_equal([w["ids"] for w in windows], [[5, 6, 7, 8], [9, 10, 11, 0], [20, 21, 22, 0]])
    np.testing.assert_array_equal([w["segment_ids"] for w in windows], [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal([w["positions"] for w in windows], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0]])


def test_text_example_scores_targets_within_a_document():
    rng = np.random.default_rng(2)
    length = 19
    for ids, segments, positions in reference_concat_then_split(_random_documents(rng, 12, length, False), length):
        window = {"ids": np.array(ids), "segment_ids": np.array(segments), "positions": np.array(positions)}
        example = text_example(window)
        for t in range(length - 1):
            assert example["tokens"][t] == ids[t] and example["targets"][t] == ids[t + 1]
            assert example["segment_ids"][t] == segments[t] and example["positions"][t] == positions[t]
            same_document = segments[t] != 0 and segments[t + 1] == segments[t]
            assert example["loss_mask"][t] == float(same_document)
