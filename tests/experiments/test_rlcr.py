"""The RLCR experiment's smoke preset runs end to end and writes its table, plots and consistent results."""

import importlib.util
import json
import pathlib

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "rlcr" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("rlcr_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_results_table_and_plots(tmp_path):
    run = load_script()
    results = run.main(["--smoke", "--output_dir", str(tmp_path)])
    for name in ("results.json", "results.md", "reliability.png", "voting.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    for split in ("in_domain", "out_of_domain"):
        for method in ("rlvr", "rlcr", "rlvr_classifier"):
            entry = saved[split][method]
            row = entry["metrics"]
            assert f"| {split} | {method} |" in table
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and 0 <= row["brier"] <= 1
            # The stored per-sample values reproduce the row (2 prompts x 4 samples).
            assert len(entry["confidence"]) == 8
            assert row["accuracy"] == np.mean(entry["correct"])
            assert entry["voting"]["num_samples"] == [1, 2, 4]
        # RLVR + classifier scores RLVR's own answers: same accuracy, different confidences.
        assert saved[split]["rlvr_classifier"]["correct"] == saved[split]["rlvr"]["correct"]
    assert results["in_domain"]["best_possible_accuracy"] > results["out_of_domain"]["best_possible_accuracy"] - 0.5


def test_classifier_tokens_end_where_the_label_is_predicted():
    run = load_script()
    from jaxlm.tasks.arithmetic import ArithmeticProblem

    problem = ArithmeticProblem(first=(3,), second=(1, 4), hidden=(3, 4))
    tokens = run.classifier_tokens(problem, "7")
    assert run.TOKENIZER.decode(tokens) == "3+{14}=<answer>7</answer><confidence>"
    assert run.read_completion("<answer>7</answer><analysis></analysis><confidence>0.5</confidence>") == ("7", 0.5)
    assert run.read_completion("<answer>7</answer>") == ("7", 0.0)
