"""The MQAR experiment: recall accuracy on hand-made predictions, its batches, and the smoke preset end to end."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from jaxlm.experiment import preset_config

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "mqar" / "run.py"


def load_script():
    if "mqar_run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mqar_run", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["mqar_run"] = module
        spec.loader.exec_module(module)
    return sys.modules["mqar_run"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    output = tmp_path_factory.mktemp("mqar") / "results.json"
    results = load_script().main(["--preset", "smoke", "--output", str(output)])
    return results, output


def test_recall_accuracy_counts_queried_values_per_pair_count():
    run = load_script()
    task_config = preset_config(run.DEFAULT_CONFIG, "smoke").task
    ids, answer_mask, pairs = run.held_out_set(task_config)  # 4 examples each of 1, 2 and 4 pairs
    expected = np.stack([run.mqar_task(task_config, int(p)).answers(row) for row, p in zip(ids, pairs)])  # [N, T+1]
    perfect = np.where(expected[:, 1:] >= 0, expected[:, 1:], 0)  # right wherever a value is queried
    predictions = np.stack([perfect, perfect.copy()])  # [S=2, N, T]
    row = int(np.flatnonzero(pairs == 4)[1])
    wrong_at = np.flatnonzero(answer_mask[row, 1:])[:3]
    predictions[1, row, wrong_at] += 1  # seed 1 misses 3 of the 16 queried values of 4-pair examples
    accuracy = run.recall_accuracy(predictions, ids, answer_mask, pairs, [1, 2, 4])
    np.testing.assert_allclose(accuracy, [[1, 1, 1], [1, 1, 13 / 16]])


def test_random_values_score_chance_and_shifted_answers_score_nothing():
    run = load_script()
    task_config = preset_config(run.DEFAULT_CONFIG, "cpu").task
    ids, answer_mask, pairs = run.held_out_set(task_config)
    task = run.mqar_task(task_config, 1)
    rng = np.random.default_rng(0)
    guesses = rng.integers(task.first_value_id, task.first_value_id + task_config.num_values, size=ids[:, 1:].shape)
    accuracy = run.recall_accuracy(guesses[None], ids, answer_mask, pairs, task_config.eval_pairs)[0]  # [P]
    scored = np.array([answer_mask[pairs == p].sum() for p in task_config.eval_pairs])  # answers per pair count
    chance = 1 / task_config.num_values
    assert (np.abs(accuracy - chance) < 4 * np.sqrt(chance * (1 - chance) / scored)).all()
    # the right answers one position late (a prediction read at the wrong place) are never right
    expected = np.stack([run.mqar_task(task_config, int(p)).answers(row) for row, p in zip(ids, pairs)])  # [N, T+1]
    late = np.where(expected[:, :-1] >= 0, expected[:, :-1], 0)  # [N, T]: the answer of position t at t + 1
    assert (run.recall_accuracy(late[None], ids, answer_mask, pairs, task_config.eval_pairs) == 0).all()


def test_only_selects_controls_and_pairs_by_name():
    run = load_script()
    config = preset_config(run.DEFAULT_CONFIG, "gpu")
    run.select_mixers(config, ["attention", "gated_deltanet"])
    assert config.controls == ("attention",)
    assert config.mixer_pairs == (("gated_deltanet", "loglinear_gated_deltanet"),)
    with pytest.raises(ValueError, match="'loglinear_mamba2'"):
        run.select_mixers(preset_config(run.DEFAULT_CONFIG, "gpu"), ["loglinear_mamba2"])


def test_batches_score_exactly_the_queried_values():
    run = load_script()
    task_config = preset_config(run.DEFAULT_CONFIG, "smoke").task
    tasks = [run.mqar_task(task_config, p) for p in task_config.train_pairs]
    train_sets = [run.draw_examples(tasks, seed, 0, 16)[:2] for seed in (0, 1)]
    chunks = list(run.batch_chunks(train_sets, steps=4, chunk_steps=2, batch_size=3, seeds=[0, 1]))
    assert len(chunks) == 2 and chunks[0]["tokens"].shape == (2, 2, 3, task_config.seq_len)
    for chunk in chunks:
        for tokens, targets, mask in zip(chunk["tokens"].reshape(-1, 16), chunk["targets"].reshape(-1, 16),
                                         chunk["loss_mask"].reshape(-1, 16)):
            sequence = np.concatenate([tokens, targets[-1:]])
            np.testing.assert_array_equal(sequence[1:], targets)
            answers = tasks[0].answers(sequence)[1:]
            np.testing.assert_array_equal(mask > 0, answers >= 0)
            np.testing.assert_array_equal(targets[mask > 0], answers[mask > 0])


def test_smoke_run_writes_matched_runs_and_consistent_accuracies(smoke):
    results, output = smoke
    saved = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 0
    runs = saved["runs"]
    assert [(r["mixer"], r["width"], r["control"]) for r in runs] == [
        ("attention", 16, True), ("mamba2", 16, False), ("loglinear_mamba2", 16, False)]
    linear, loglinear = runs[1:]
    assert linear["mlp_dim"] > loglinear["mlp_dim"]  # the linear model's SwiGLU absorbs the λ parameters
    assert abs(linear["num_params"] - loglinear["num_params"]) <= 3 * 16  # within one hidden unit
    for run in runs:
        accuracy = np.array(run["accuracy"])  # [seeds, pair counts]
        assert accuracy.shape == (2, 3) and ((0 <= accuracy) & (accuracy <= 1)).all()
        np.testing.assert_allclose(run["mean_accuracy"], accuracy.mean(axis=0))
        assert [point["step"] for point in run["curve"]] == [2, 4]
        assert run["curve"][-1]["accuracy"] == run["accuracy"]
        assert all(np.isfinite(run["final_loss"]))
    assert results["runs"][1]["num_params"] == linear["num_params"]


def test_bad_pair_count_is_named():
    run = load_script()
    task_config = preset_config(run.DEFAULT_CONFIG, "smoke").task
    task_config.eval_pairs = (5,)  # 4 * 5 tokens do not fit in seq_len + 1 = 17
    with pytest.raises(ValueError, match="task.eval_pairs holds 5"):
        run.check_task(task_config)
