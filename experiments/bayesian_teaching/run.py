"""Bayesian vs oracle teaching of small LMs trained from scratch on the flight task (Qiu et al. 2025).

For each training-set size, the same dialogues are rendered twice: with the Bayesian assistant's
recommendations as the model's turns (Bayesian teaching) and with the user's true choices (oracle
teaching). Two identical models are trained with SFT (loss on the recommendation tokens only) under one
recipe for every size and teaching (``training.py``: the same step budget, the checkpoint with the
lowest loss on a validation split of the same teaching is kept) and evaluated on fresh users and
option sets:

- round by round: the model recommends in each of the 5 rounds, seeing its own earlier
  recommendations and the user's true choices; scored against the user's choice (accuracy) and
  against the Bayesian assistant's recommendation in the same situation (agreement);
- held-out sets: after r = 0 … 5 observed rounds, a fresh option set (r = 5 is one round longer
  than any training dialogue);
- transfer, without training on them: the hotel task and the flight task with 2–8 features.

    python experiments/bayesian_teaching/run.py --config smoke   # seconds, CPU (used by the tests)
    python experiments/bayesian_teaching/run.py --config cpu     # about ten minutes on a 2-core CPU
    python experiments/bayesian_teaching/run.py --config full    # one H100: about 7 min of training + 2 min scoring

``--sizes``, ``--steps`` and ``--learning-rate`` override the preset and ``--tag`` names the outputs
(e.g. for the learning-rate pilot described in the README).

Writes ``results_<config>.json``, ``results_<config>.md`` (the tables) and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import numpy as np
from flax import nnx

from jaxlm.experiment import load_file_module
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.tasks.flights import (FLIGHTS, HOTELS, NUM_ROUNDS, PreferenceTask, bayesian_recommendations,
                                 flights_with_features, sample_option_levels, user_choices)
from jaxlm.tasks.flights_dialogue import (DIALOGUE_TOKENIZER, TEACHINGS, Dialogues, heldout_recommendations,
                                          interactive_recommendations, sample_dialogues)

HERE = os.path.dirname(os.path.abspath(__file__))
training = load_file_module(os.path.join(HERE, "training.py"), "bayesian_teaching_training")
Recipe = training.Recipe
TRAIN_SEED, EVAL_SEED, VALID_SEED = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: model shape, training-set sizes, the SFT recipe (shared by all runs) and the evaluation sets."""

    data_sizes: tuple[int, ...]
    recipe: Recipe
    d_model: int
    num_layers: int
    num_heads: int
    eval_dialogues: int
    transfer_features: tuple[int, ...]
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=DIALOGUE_TOKENIZER.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_heads, mlp_dim=4 * self.d_model,
                           max_seq_len=256)


CONFIGS = {
    "smoke": ExperimentConfig(data_sizes=(16,), recipe=Recipe(steps=6, batch_size=8, learning_rate=1e-3,
                                                                 warmup_steps=1, eval_every=3, valid_dialogues=24),
                              d_model=16, num_layers=1, num_heads=2, eval_dialogues=16, transfer_features=(3,)),
    "cpu": ExperimentConfig(data_sizes=(256, 4096), recipe=Recipe(steps=400, batch_size=32, learning_rate=3e-3,
                                                                  warmup_steps=20, eval_every=40, valid_dialogues=512),
                            d_model=32, num_layers=2, num_heads=4, eval_dialogues=256, transfer_features=(3,)),
    "full": ExperimentConfig(data_sizes=(256, 1024, 4096, 16384, 65536),
                             recipe=Recipe(steps=4000, batch_size=256, learning_rate=2e-3, warmup_steps=200,
                                           eval_every=250, valid_dialogues=1024),
                             d_model=128, num_layers=4, num_heads=4, eval_dialogues=2048,
                             transfer_features=(2, 3, 5, 6, 7, 8)),
}


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Fresh dialogues of one task, held-out option sets [N, R+1, 3, F], and the assistant's and user's picks."""

    dialogues: Dialogues
    heldout_levels: np.ndarray
    heldout_choices: np.ndarray
    heldout_assistant: np.ndarray


def make_eval_set(task: PreferenceTask, num_dialogues: int, seed: int) -> EvalSet:
    dialogues = sample_dialogues(task, num_dialogues, seed)
    heldout = sample_option_levels(task, np.random.default_rng([seed, 1]), (num_dialogues, NUM_ROUNDS + 1))
    return EvalSet(dialogues, heldout, user_choices(task, dialogues.users, heldout),
                   bayesian_recommendations(task, dialogues.levels, dialogues.choices, heldout))


def assistant_scores(eval_set: EvalSet) -> dict[str, list[float]]:
    """The Bayesian assistant's own accuracy on the evaluation set (agreement with itself is 1)."""
    dialogues = eval_set.dialogues
    return {"round_accuracy": (dialogues.recommendations == dialogues.choices).mean(0).tolist(),
            "heldout_accuracy": (eval_set.heldout_assistant == eval_set.heldout_choices).mean(0).tolist()}


def model_scores(model: nnx.Module, eval_set: EvalSet) -> dict[str, list[float]]:
    """Per-round accuracy and agreement of the model, in dialogue and on held-out sets."""
    dialogues = eval_set.dialogues
    in_dialogue = interactive_recommendations(model, dialogues)  # [N, R]
    heldout = heldout_recommendations(model, dialogues, in_dialogue, eval_set.heldout_levels)  # [N, R+1]
    return {"round_accuracy": (in_dialogue == dialogues.choices).mean(0).tolist(),
            "round_agreement": (in_dialogue == dialogues.recommendations).mean(0).tolist(),
            "heldout_accuracy": (heldout == eval_set.heldout_choices).mean(0).tolist(),
            "heldout_agreement": (heldout == eval_set.heldout_assistant).mean(0).tolist()}


def train_model(config: ExperimentConfig, train_dialogues: Dialogues, valid_dialogues: Dialogues,
                teaching: str) -> tuple[DecoderLM, list[dict]]:
    """A fresh model (same init and batch order for every teaching and size) trained by the recipe; returns it
    holding its kept checkpoint, and the validation history."""
    model = DecoderLM(config.model_config(), rngs=nnx.Rngs(config.seed))
    history = training.train_with_validation(model, training.teaching_rows(train_dialogues, teaching),
                                             training.teaching_rows(valid_dialogues, teaching), config.recipe,
                                             seed=config.seed)
    return model, history


def run_experiment(config: ExperimentConfig, log=functools.partial(print, flush=True)) -> dict:
    """Train every (teaching, data size) pair and score it on every evaluation task; returns the results dict."""
    tasks = [FLIGHTS, HOTELS] + [flights_with_features(n) for n in config.transfer_features]
    eval_sets = {task.name: make_eval_set(task, config.eval_dialogues, EVAL_SEED) for task in tasks}
    results = {"config": dataclasses.asdict(config),
               "assistant": {name: assistant_scores(eval_set) for name, eval_set in eval_sets.items()},
               "runs": []}
    valid_dialogues = sample_dialogues(FLIGHTS, config.recipe.valid_dialogues, VALID_SEED)
    for size in config.data_sizes:
        train_dialogues = sample_dialogues(FLIGHTS, size, TRAIN_SEED)
        for teaching in TEACHINGS:
            start = time.time()
            model, history = train_model(config, train_dialogues, valid_dialogues, teaching)
            kept = next(record for record in history if record["kept"])
            scores = {name: model_scores(model, eval_set) for name, eval_set in eval_sets.items()}
            results["runs"].append({"teaching": teaching, "train_dialogues": size, "kept_step": kept["step"],
                                    "valid_loss": kept["valid_loss"], "history": history,
                                    "seconds": time.time() - start, "scores": scores})
            flights = scores[FLIGHTS.name]
            log(f"{teaching:8s} n={size:6d} kept step {kept['step']} valid loss {kept['valid_loss']:.3f} "
                f"(last train loss {history[-1]['train_loss']:.3f}) round acc "
                + " ".join(f"{100 * a:.1f}" for a in flights["round_accuracy"])
                + f"  agree {100 * np.mean(flights['round_agreement']):.1f}  ({time.time() - start:.0f}s)")
    return results


def percent(values) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def results_table(results: dict) -> str:
    """Markdown tables: flight accuracy/agreement per round, held-out curve, transfer (mean over rounds)."""
    assistant = results["assistant"][FLIGHTS.name]
    lines = ["| teaching | train dialogues | accuracy, rounds 1–5 (%) | final round | agreement w/ assistant (%) "
             "| kept step | valid loss |",
             "|---|---|---|---|---|---|---|",
             f"| Bayesian assistant | – | {percent(assistant['round_accuracy'])} | "
             f"{100 * assistant['round_accuracy'][-1]:.1f} | 100 | – | – |"]
    for run in results["runs"]:
        flights = run["scores"][FLIGHTS.name]
        lines.append(f"| {run['teaching']} | {run['train_dialogues']} | {percent(flights['round_accuracy'])} | "
                     f"{100 * flights['round_accuracy'][-1]:.1f} | {100 * np.mean(flights['round_agreement']):.1f} | "
                     f"{run['kept_step']} | {run['valid_loss']:.3f} |")
    lines += ["", "Held-out option sets after r = 0 … 5 observed rounds (accuracy %, r = 5 is longer than training):", "",
              "| teaching | train dialogues | r = 0 … 5 |", "|---|---|---|",
              f"| Bayesian assistant | – | {percent(assistant['heldout_accuracy'])} |"]
    for run in results["runs"]:
        lines.append(f"| {run['teaching']} | {run['train_dialogues']} | "
                     f"{percent(run['scores'][FLIGHTS.name]['heldout_accuracy'])} |")
    names = list(results["assistant"])
    lines += ["", "Transfer without training (accuracy % averaged over rounds 1–5; assistant in the first row):", "",
              "| teaching | train dialogues | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
              "| Bayesian assistant | – | " + " | ".join(
                  f"{100 * np.mean(results['assistant'][name]['round_accuracy']):.1f}" for name in names) + " |"]
    for run in results["runs"]:
        lines.append(f"| {run['teaching']} | {run['train_dialogues']} | " + " | ".join(
            f"{100 * np.mean(run['scores'][name]['round_accuracy']):.1f}" for name in names) + " |")
    return "\n".join(lines)


def plot_results(results: dict, out_dir: str, tag: str) -> list[str]:
    """Four PNGs: accuracy per round (largest data size), final-round accuracy vs data size, transfer, and the
    train and validation loss curves of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, assistant = results["runs"], results["assistant"]
    largest = max(run["train_dialogues"] for run in runs)
    paths = []
    figure, axis = plt.subplots(figsize=(5, 3.5))
    rounds = np.arange(1, NUM_ROUNDS + 1)
    axis.plot(rounds, 100 * np.array(assistant[FLIGHTS.name]["round_accuracy"]), "k--", label="Bayesian assistant")
    for run in runs:
        if run["train_dialogues"] == largest:
            axis.plot(rounds, 100 * np.array(run["scores"][FLIGHTS.name]["round_accuracy"]), "o-",
                      label=f"{run['teaching']} teaching")
    axis.set(xlabel="round", ylabel="accuracy (%)", title=f"Flights, {largest} training dialogues")
    axis.legend()
    paths.append(_save(figure, out_dir, f"round_accuracy_{tag}.png"))

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for teaching in TEACHINGS:
        chosen = [run for run in runs if run["teaching"] == teaching]
        axis.plot([run["train_dialogues"] for run in chosen],
                  [100 * run["scores"][FLIGHTS.name]["round_accuracy"][-1] for run in chosen], "o-", label=teaching)
    axis.axhline(100 * assistant[FLIGHTS.name]["round_accuracy"][-1], color="k", ls="--", label="Bayesian assistant")
    axis.set(xscale="log", xlabel="training dialogues", ylabel="final-round accuracy (%)", title="Sample efficiency")
    axis.legend()
    paths.append(_save(figure, out_dir, f"data_size_{tag}.png"))

    figure, axis = plt.subplots(figsize=(6, 3.5))
    names = list(assistant)
    width = 0.27
    positions = np.arange(len(names))
    axis.bar(positions - width, [100 * np.mean(assistant[name]["round_accuracy"]) for name in names], width,
             label="Bayesian assistant", color="0.6")
    for offset, teaching in zip((0, width), TEACHINGS):
        run = next(run for run in runs if run["teaching"] == teaching and run["train_dialogues"] == largest)
        axis.bar(positions + offset, [100 * np.mean(run["scores"][name]["round_accuracy"]) for name in names], width,
                 label=f"{teaching} teaching")
    axis.set_xticks(positions, names, rotation=30)
    axis.set(ylabel="accuracy, mean of rounds (%)", title=f"Transfer (trained on flights, {largest} dialogues)")
    axis.legend(fontsize=8)
    paths.append(_save(figure, out_dir, f"transfer_{tag}.png"))

    figure, axes = plt.subplots(1, len(TEACHINGS), figsize=(9, 3.5), sharey=True)
    for axis, teaching in zip(axes, TEACHINGS):
        for run in (run for run in runs if run["teaching"] == teaching):
            steps = [record["step"] for record in run["history"]]
            line, = axis.plot(steps, [record["valid_loss"] for record in run["history"]],
                              label=f"{run['train_dialogues']} valid")
            axis.plot(steps, [record["train_loss"] for record in run["history"]], ":", color=line.get_color())
            axis.plot(run["kept_step"], run["valid_loss"], "o", color=line.get_color())
        axis.axhline(np.log(3), color="k", lw=0.5)
        axis.set(xlabel="step", title=f"{teaching} teaching (dotted: train, dot: kept)")
    axes[0].set(ylabel="loss on assistant turns")
    axes[0].legend(fontsize=7)
    paths.append(_save(figure, out_dir, f"loss_curves_{tag}.png"))
    return paths


def _save(figure, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=tuple(CONFIGS), default="full")
    parser.add_argument("--smoke", action="store_true", help="shorthand for --config smoke")
    parser.add_argument("--out", default=HERE, help="folder for the results JSON, the table and the plots")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="training-set sizes (default: the preset's)")
    parser.add_argument("--steps", type=int, default=0, help="SFT steps of every run (0: the preset's)")
    parser.add_argument("--learning-rate", type=float, default=0.0, help="peak learning rate (0: the preset's)")
    parser.add_argument("--tag", default="", help="output file suffix (default: the config name)")
    args = parser.parse_args(argv)
    config = CONFIGS["smoke" if args.smoke else args.config]
    recipe = dataclasses.replace(config.recipe, steps=args.steps or config.recipe.steps,
                                 learning_rate=args.learning_rate or config.recipe.learning_rate).validate()
    config = dataclasses.replace(config, seed=args.seed, recipe=recipe,
                                 data_sizes=tuple(args.sizes) if args.sizes else config.data_sizes)
    name = args.tag or ("smoke" if args.smoke else args.config)
    os.makedirs(args.out, exist_ok=True)
    results = run_experiment(config)
    table = results_table(results)
    with open(os.path.join(args.out, f"results_{name}.json"), "w") as file:
        json.dump(results, file, indent=1)
    with open(os.path.join(args.out, f"results_{name}.md"), "w") as file:
        file.write(table + "\n")
    plot_results(results, args.out, name)
    print(table)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
