"""The flip-flop experiment: read errors are counted right on known cases, the evaluation targets sit on the
bits after each read, and the smoke preset runs end to end with counts that match its evaluation sets."""

import importlib.util
import json
import pathlib

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "flipflop" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("flipflop_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_read_errors_on_a_hand_made_case():
    run = load_script()
    expected = np.array([[-1, 4, -1, 3, -1, 4],
                         [-1, -1, -1, -1, -1, -1],
                         [3, -1, 3, -1, -1, -1]])
    predictions = np.array([[7, 4, 0, 4, 5, 3],  # reads at 1, 3, 5: 1 right, 2 wrong (non-read slots ignored)
                            [1, 1, 1, 1, 1, 1],  # no reads: neither scored nor failed
                            [3, 4, 3, 3, 3, 3]])  # both reads right
    scores = run.read_errors(predictions, expected)
    assert (scores["reads"], scores["wrong_reads"]) == (5, 2)
    assert (scores["sequences"], scores["failed_sequences"]) == (2, 1)
    assert scores["read_error_rate"] == 2 / 5 and scores["sequence_error_rate"] == 1 / 2


def test_evaluation_targets_are_the_bits_after_reads():
    run = load_script()
    task = run.flipflop_task(40, "dense")
    tokens, expected = run.evaluation_set(task, seed=3, count=24)
    assert tokens.shape == expected.shape == (24, 40)
    read_id, zero_id, one_id = task.tokenizer.ids_of(["r", "0", "1"])
    # The target after an input "r" is the bit it reads, and nothing else is scored.
    np.testing.assert_array_equal(expected >= 0, tokens == read_id)
    assert set(np.unique(expected[expected >= 0])) <= {zero_id, one_id}
    # Brute force on one row: the expected bit is the bit after the latest earlier "w".
    write_id = task.tokenizer.id_of("w")
    for t in np.flatnonzero(expected[5] >= 0):
        last_write = max(s for s in range(0, t, 2) if tokens[5, s] == write_id)
        assert expected[5, t] == tokens[5, last_write + 1]
    perfect = np.where(expected >= 0, expected, 0)
    flipped = np.where(expected == zero_id, one_id, zero_id)
    assert run.read_errors(perfect, expected)["read_error_rate"] == 0.0
    assert run.read_errors(flipped, expected)["read_error_rate"] == 1.0


def test_smoke_run_writes_consistent_results(tmp_path):
    run = load_script()
    results = run.main(["--preset", "smoke", "--output", str(tmp_path)])
    for name in ("results.json", "results.md", "error_rates.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    config = results["config"]
    assert [entry["variant"] for entry in saved["runs"]] == config["variants"] == ["rope", "fox"]
    table = (tmp_path / "results.md").read_text()
    for density in run.DENSITIES:
        # The stored counts are those of the evaluation set, rebuilt here from the same seed.
        task = run.flipflop_task(config["train"]["seq_len"], density)
        _, expected = run.evaluation_set(task, config["seed"], config["eval"]["sequences"][density])
        for entry in saved["runs"]:
            scores = entry["scores"][density]
            assert scores["reads"] == int((expected >= 0).sum()) > 0
            assert scores["sequences"] == int((expected >= 0).any(axis=1).sum())
            assert scores["read_error_rate"] == scores["wrong_reads"] / scores["reads"]
            assert 0 <= scores["failed_sequences"] <= scores["sequences"]
            assert scores["wrong_reads"] >= scores["failed_sequences"]
            assert saved["summary"][entry["variant"]][density]["read_error_rate"] == scores["read_error_rate"]
    for entry in saved["runs"]:
        assert f"| {entry['variant']} |" in table
        assert entry["history"][-1]["step"] == config["train"]["steps"] and np.isfinite(entry["history"][-1]["loss"])
