"""The Bayesian-teaching experiment: loss masks of the teaching rows, batching, and an end-to-end smoke run
that keeps the best validation checkpoint and writes its outputs."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np

from jaxlm.experiment import load_file_module
from jaxlm.tasks.flights import FLIGHTS, HOTELS, NUM_ROUNDS
from jaxlm.tasks.flights_dialogue import DIALOGUE_TOKENIZER, OPTION_NAMES, sample_dialogues

FOLDER = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bayesian_teaching"
run = load_file_module(FOLDER / "run.py", "bayesian_teaching_run")
training = run.training


def test_teaching_rows_score_exactly_the_assistant_turns():
    dialogues = sample_dialogues(HOTELS, 7, seed=5)
    first_option = DIALOGUE_TOKENIZER.id_of(OPTION_NAMES[0])
    recommend_id = DIALOGUE_TOKENIZER.id_of(">")
    for teaching, labels in (("bayesian", dialogues.recommendations), ("oracle", dialogues.choices)):
        rows = training.teaching_rows(dialogues, teaching)
        mask = rows["loss_mask"]  # [N, T]
        assert mask.shape == rows["tokens"].shape == (7, NUM_ROUNDS * 20)
        # Scored exactly where the input is the recommend marker ">" (the next token is the assistant's X).
        np.testing.assert_array_equal(mask > 0, rows["tokens"] == recommend_id)
        assert mask.sum(1).tolist() == [NUM_ROUNDS] * 7
        np.testing.assert_array_equal(rows["targets"][mask > 0].reshape(7, NUM_ROUNDS), first_option + labels)
        # The context (the user's true choice Y after "=") is the same in both teachings.
        chosen = rows["tokens"] == DIALOGUE_TOKENIZER.id_of("=")
        np.testing.assert_array_equal(rows["targets"][chosen].reshape(7, NUM_ROUNDS), first_option + dialogues.choices)


def test_shuffled_batches_visit_every_row_once_per_epoch():
    rows = {"tokens": np.arange(10)[:, None] * np.ones((1, 3), np.int32)}
    batches = training.shuffled_batches(rows, batch_size=4, seed=0)
    seen = np.concatenate([next(batches)["tokens"][:, 0] for _ in range(5)])  # 20 rows = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert seen[:10].tolist() != list(range(10))  # shuffled


def test_padded_batches_keep_every_row_and_never_score_padding():
    dialogues = sample_dialogues(FLIGHTS, 5, seed=1)
    rows = training.teaching_rows(dialogues, "oracle")
    batches = list(training.padded_batches(rows, batch_size=4))
    assert [len(batch["tokens"]) for batch in batches] == [4, 4]
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches])[:5], rows["tokens"])
    assert batches[1]["loss_mask"][1:].sum() == 0 and sum(b["loss_mask"].sum() for b in batches) == 5 * NUM_ROUNDS


def masked_loss_float64(model, rows) -> float:
    """Mean cross-entropy over the scored tokens, recomputed in float64 from the model's logits."""
    logits = np.asarray(model(jnp.asarray(rows["tokens"])), np.float64)  # [N, T, V]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, rows["targets"][..., None], -1)[..., 0]  # [N, T]
    return float(-(picked * rows["loss_mask"]).sum() / rows["loss_mask"].sum())


def test_smoke_run_keeps_the_best_checkpoint_and_writes_its_outputs(tmp_path, monkeypatch):
    trained = []  # (model, validation dialogues, teaching) of every run
    train_model = run.train_model

    def recording_train_model(config, train_dialogues, valid_dialogues, teaching):
        model, history = train_model(config, train_dialogues, valid_dialogues, teaching)
        trained.append((model, valid_dialogues, teaching))
        return model, history

    monkeypatch.setattr(run, "train_model", recording_train_model)
    # A high learning rate over 12 steps makes the validation loss turn up before the end (seeded, so fixed).
    results = run.main(["--smoke", "--steps", "12", "--learning-rate", "0.1", "--out", str(tmp_path)])
    names = {path.name for path in tmp_path.iterdir()}
    assert {"results_smoke.json", "results_smoke.md", "round_accuracy_smoke.png", "data_size_smoke.png",
            "transfer_smoke.png", "loss_curves_smoke.png"} <= names
    saved = json.loads((tmp_path / "results_smoke.json").read_text())
    assert saved["config"]["recipe"]["steps"] == 12 and saved["config"]["recipe"]["learning_rate"] == 0.1
    assert [(r["teaching"], r["train_dialogues"]) for r in results["runs"]] == [("bayesian", 16), ("oracle", 16)]
    assert set(results["assistant"]) == {"flights", "hotels", "flights3"}
    for run_result, (model, valid_dialogues, teaching) in zip(results["runs"], trained, strict=True):
        history = run_result["history"]
        losses = [record["valid_loss"] for record in history]
        assert [record["step"] for record in history] == [3, 6, 9, 12]
        assert run_result["kept_step"] == history[int(np.argmin(losses))]["step"]
        assert run_result["valid_loss"] == min(losses)
        assert [record["kept"] for record in history] == [loss == min(losses) for loss in losses]
        # The evaluated model holds the kept parameters: its validation loss, recomputed independently.
        valid_rows = training.teaching_rows(valid_dialogues, teaching)
        np.testing.assert_allclose(masked_loss_float64(model, valid_rows), min(losses), rtol=1e-4)
    assert min(r["kept_step"] for r in results["runs"]) < 12  # some run keeps an earlier step than the last
    for scores in [results["assistant"]["flights"]] + [r["scores"]["flights"] for r in results["runs"]]:
        assert len(scores["round_accuracy"]) == NUM_ROUNDS and len(scores["heldout_accuracy"]) == NUM_ROUNDS + 1
        assert all(0.0 <= value <= 1.0 for value in scores["round_accuracy"])
    # The assistant's scores are recomputed independently from the evaluation set it was built on.
    eval_set = run.make_eval_set(run.FLIGHTS, run.CONFIGS["smoke"].eval_dialogues, run.EVAL_SEED)
    np.testing.assert_allclose(results["assistant"]["flights"]["round_accuracy"],
                               (eval_set.dialogues.recommendations == eval_set.dialogues.choices).mean(0))
    table = (tmp_path / "results_smoke.md").read_text()
    assert "| Bayesian assistant |" in table and "| bayesian | 16 |" in table and "| oracle | 16 |" in table
