"""The TTT-on-ARC experiment's smoke preset runs end to end on CPU and reports every setting."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ttt_arc" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ttt_arc_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through the module registry
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_all_settings(tmp_path):
    script = load_script()
    results = script.main(["--smoke", "--out", str(tmp_path)])
    assert results["num_held_out_tasks"] == 2 and len(results["held_out_families"]) == 2
    settings = ["FT only", "FT + TTT", "FT + TTT, flat voting", "FT + TTT, no augmentation", "FT + shared adapter"]
    assert list(results["held_out"]) == settings
    assert all(0.0 <= solved <= 2.0 for solved in results["held_out"].values())
    assert results["finetune_final"]["step"] == script.PRESETS["smoke"].ft_steps
    assert json.loads((tmp_path / "results.json").read_text())["held_out"] == results["held_out"]
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(settings) and table[2].startswith("| FT only |")
    train_families, held_out = script.family_split(2, 0)
    assert results["held_out_families"] == held_out


def test_fitting_arc_tasks_respect_context_and_answer_budget():
    script = load_script()
    preset = script.PRESETS["gpu"]
    tasks = script.load_arc_tasks("evaluation")
    fitting = script.fitting_arc_tasks(tasks, preset)
    assert 0 < len(fitting) < len(tasks)
    for task in fitting:
        assert script.task_length(task) <= preset.model.max_seq_len
    left_out = [t for t in tasks if t not in fitting]
    assert all(any(script.task_length(t, i) > preset.model.max_seq_len
                   or script.answer_length(out.shape) > preset.ttt.max_new_tokens
                   for i, (_, out) in enumerate(t.tests)) for t in left_out)


def test_finetune_then_evaluate_phases_round_trip_the_model(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "MAX_SHARD_BYTES", 4096)  # several shards even for the tiny model
    preset = script.PRESETS["smoke"]
    tuned = script.run("smoke", phase="finetune", model_dir=tmp_path)
    assert len(list(tmp_path.glob("model-*.npz"))) > 1
    assert "held_out" not in tuned and tuned["finetune_final"]["step"] == preset.ft_steps
    model, record = script.load_model(preset, tmp_path)
    assert record["finetune_final"] == tuned["finetune_final"]
    saved = {}
    for shard in sorted(tmp_path.glob("model-*.npz")):
        saved.update(np.load(shard))
    leaves = jax.tree_util.tree_flatten_with_path(script.nnx.state(model, script.nnx.Param))[0]
    assert len(leaves) == len(saved)
    fresh = jax.tree_util.tree_flatten_with_path(script.nnx.state(script.DecoderLM(preset.model, rngs=script.nnx.Rngs(0)),
                                                                  script.nnx.Param))[0]
    changed = 0
    for (path, leaf), (_, initial) in zip(leaves, fresh):
        np.testing.assert_array_equal(np.asarray(leaf), saved[jax.tree_util.keystr(path)])
        changed += not np.array_equal(np.asarray(leaf), np.asarray(initial))
    assert changed > 0  # the loaded values are the fine-tuned ones, not a fresh init
    scored = script.run("smoke", phase="evaluate", model_dir=tmp_path, settings=("ft",))
    assert list(scored["held_out"]) == ["FT only"] and scored["finetune_final"] == tuned["finetune_final"]


def test_evaluate_phase_without_a_saved_model_names_the_missing_file(tmp_path):
    script = load_script()
    with pytest.raises(FileNotFoundError, match="finetune.json"):
        script.load_model(script.PRESETS["smoke"], tmp_path)
