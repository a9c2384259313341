"""The A5 state-tracking experiment: accuracies on hand-made predictions, its batches, and the smoke preset."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "state_tracking" / "run.py"


def load_script():
    if "state_tracking_run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("state_tracking_run", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["state_tracking_run"] = module
        spec.loader.exec_module(module)
    return sys.modules["state_tracking_run"]


def test_tracking_accuracy_on_hand_made_predictions():
    run = load_script()
    targets = np.array([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])  # [N=3, T=4]
    predictions = np.stack([targets, targets.copy()])  # [S=2, N, T]
    predictions[1, 0, 1] = 0  # seed 1: word 0 wrong at position 2
    predictions[1, 2, 3] = 0  # seed 1: word 2 wrong at position 4
    accuracy = run.tracking_accuracy(predictions, targets)
    np.testing.assert_allclose(accuracy["per_position"], [[1, 1, 1, 1], [1, 2 / 3, 1, 2 / 3]])
    np.testing.assert_allclose(accuracy["token"], [1, 10 / 12])
    np.testing.assert_allclose(accuracy["sequence"], [1, 1 / 3])
    np.testing.assert_array_equal(accuracy["tracked_length"], [4, 1])  # 2/3 < 0.9 from position 2 on


def test_batches_pair_words_with_their_running_products():
    run = load_script()
    from jaxlm.tasks.permutation import PermutationTask

    task = PermutationTask("a5", seq_len=5)
    chunks = list(run.batch_chunks(task, steps=4, chunk_steps=2, batch_size=3, seeds=[0, 1]))
    assert len(chunks) == 2 and chunks[0]["tokens"].shape == (2, 2, 3, 5)
    assert (chunks[0]["tokens"][:, 0] != chunks[0]["tokens"][:, 1]).any()  # the seeds see different words
    for chunk in chunks:
        assert (chunk["loss_mask"] == 1).all()
        for word, products in zip(chunk["tokens"].reshape(-1, 5), chunk["targets"].reshape(-1, 5)):
            np.testing.assert_array_equal(task.running_products(word), products)


def test_curriculum_stages_cover_the_calls_in_order():
    run = load_script()
    curriculum = ((4, 0.1), (8, 0.15), (16, 0.25), (32, 0.5))
    run.check_curriculum(curriculum, 32)
    # 20 calls: stage ends at 2, 5, 10 and 20 calls (cumulative fractions 0.1, 0.25, 0.5, 1)
    assert run.scored_lengths(curriculum, 20, 32) == [4] * 2 + [8] * 3 + [16] * 5 + [32] * 10
    assert run.scored_lengths(((3, 1.0),), 4, 3) == [3] * 4
    assert run.scored_lengths((), 3, 9) == [9] * 3  # no curriculum: every position from the start
    for bad in (((8, 0.5), (4, 0.5)), ((4, 0.5), (16, 0.5)), ((4, 0.5), (32, 0.6)), ((4, 0.0), (32, 1.0)), ()):
        with pytest.raises(ValueError, match="task.curriculum"):
            run.check_curriculum(bad, 32)


def test_curriculum_batches_score_only_the_stage_prefix():
    run = load_script()
    from jaxlm.tasks.permutation import PermutationTask

    task = PermutationTask("a5", seq_len=7)
    curriculum = ((2, 0.25), (5, 0.25), (7, 0.5))
    chunks = list(run.batch_chunks(task, steps=8, chunk_steps=2, batch_size=3, seeds=[0, 1], curriculum=curriculum))
    scored = [chunk["loss_mask"].sum(axis=-1) for chunk in chunks]  # [K, S, B] scored positions per word
    for chunk_scored, length in zip(scored, (2, 5, 7, 7)):
        assert (chunk_scored == length).all()
    first = chunks[0]["loss_mask"][0, 0, 0]  # [T]
    np.testing.assert_array_equal(first, [1, 1, 0, 0, 0, 0, 0])  # the prefix, not any other positions
    plain = next(run.batch_chunks(task, steps=8, chunk_steps=2, batch_size=3, seeds=[0, 1]))
    np.testing.assert_array_equal(plain["tokens"], chunks[0]["tokens"])  # the curriculum changes only the mask


def test_smoke_run_writes_results_and_plot(tmp_path):
    run = load_script()
    output = tmp_path / "results.json"
    results = run.main(["--preset", "smoke", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 0
    assert [(r["mixer"], r["num_layers"]) for r in saved["runs"]] == [("attention", 1), ("path", 1)]
    attention, path = saved["runs"]
    assert path["num_params"] > attention["num_params"]  # PaTH's Householder projections
    for entry in saved["runs"]:
        per_position = np.array(entry["per_position"])  # [seeds, T]
        assert per_position.shape == (2, 6) and ((0 <= per_position) & (per_position <= 1)).all()
        np.testing.assert_allclose(entry["token"], per_position.mean(axis=1))
        assert all(s <= t for s, t in zip(entry["sequence"], entry["token"]))
        assert [point["step"] for point in entry["curve"]] == [2, 4]
        assert [point["scored_length"] for point in entry["curve"]] == [2, 6]  # the smoke curriculum
        assert all(np.isfinite(entry["final_loss"]))
    assert results["runs"][1]["mixer"] == "path"
