"""The Bayesian-teaching experiment runs end to end in its smoke configuration and writes its outputs."""

import importlib.util
import json
import pathlib
import sys

import numpy as np

from jaxlm.tasks.flights import NUM_ROUNDS

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bayesian_teaching" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bayesian_teaching_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_tables_plots_and_consistent_scores(tmp_path):
    run = load_script()
    results = run.main(["--smoke", "--out", str(tmp_path)])
    names = {path.name for path in tmp_path.iterdir()}
    assert {"results_smoke.json", "results_smoke.md", "round_accuracy_smoke.png", "data_size_smoke.png",
            "transfer_smoke.png"} <= names
    assert json.loads((tmp_path / "results_smoke.json").read_text())["config"]["steps"] == run.CONFIGS["smoke"].steps
    assert [(r["teaching"], r["train_dialogues"]) for r in results["runs"]] == [("bayesian", 16), ("oracle", 16)]
    assert set(results["assistant"]) == {"flights", "hotels", "flights3"}
    for scores in [results["assistant"]["flights"]] + [r["scores"]["flights"] for r in results["runs"]]:
        assert len(scores["round_accuracy"]) == NUM_ROUNDS and len(scores["heldout_accuracy"]) == NUM_ROUNDS + 1
        assert all(0.0 <= value <= 1.0 for value in scores["round_accuracy"])
    # The assistant's scores are recomputed independently from the evaluation set it was built on.
    eval_set = run.make_eval_set(run.FLIGHTS, run.CONFIGS["smoke"].eval_dialogues, run.EVAL_SEED)
    np.testing.assert_allclose(results["assistant"]["flights"]["round_accuracy"],
                               (eval_set.dialogues.recommendations == eval_set.dialogues.choices).mean(0))
    table = (tmp_path / "results_smoke.md").read_text()
    assert "| Bayesian assistant |" in table and "| bayesian | 16 |" in table and "| oracle | 16 |" in table
