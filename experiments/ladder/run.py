"""Ladder residual at toy scale: quality from scratch, and converting a trained standard model.

``quality``: standard, parallel and ladder models of the same shape trained from scratch on the same
synthetic data (same batches, same init seed per seed) for ``--seeds`` seeds; validation loss per mode,
mean and spread, and the ladder's relative gap to standard (target: within 2%).

``convert``: train a standard model, convert its last ``--ladder-layers`` layers to ladder
(``jaxlm.convert.to_ladder``), then compare validation loss of the original, the zero-shot conversion
and the conversion fine-tuned for ``--finetune-steps`` steps (the paper's recipe in miniature).

Data: a synthetic language, generated here and the same for every run: tokens follow a random sparse
second-order Markov chain (each context allows 4 next tokens with random probabilities), and each
sequence repeats one earlier random span later on, so a model gains from both local statistics and
in-context copying. Validation sequences are held-out draws from the same source.

    python experiments/ladder/run.py quality            # full toy config (minutes on a CPU)
    python experiments/ladder/run.py convert
    python experiments/ladder/run.py quality --smoke    # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.convert import to_ladder
from jaxlm.models import DecoderLM, ModelConfig
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.config import MeshConfig, OptimizerConfig, TrainConfig
from jaxlm.train.optim import make_optimizer
from jaxlm.train.step import create_train_state, make_eval_step, make_train_step, metrics_from_sums

VOCAB = 64
BRANCHING = 4  # next tokens allowed after each two-token context


@dataclasses.dataclass(frozen=True)
class Setup:
    model: ModelConfig
    steps: int
    batch_size: int
    seq_len: int
    eval_batches: int
    learning_rate: float


FULL = Setup(ModelConfig(vocab_size=VOCAB, d_model=64, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=192,
                         max_seq_len=64), steps=200, batch_size=8, seq_len=64, eval_batches=8,
             learning_rate=3e-3)
SMOKE = Setup(ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64,
                          max_seq_len=32), steps=3, batch_size=4, seq_len=32, eval_batches=1, learning_rate=3e-3)


def markov_table(seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """``next_tokens [V, V, BRANCHING]`` and their probabilities for the second-order chain."""
    rng = np.random.default_rng(seed)
    next_tokens = rng.integers(0, VOCAB, size=(VOCAB, VOCAB, BRANCHING))
    probabilities = rng.dirichlet(np.ones(BRANCHING) * 0.5, size=(VOCAB, VOCAB))
    return next_tokens, probabilities


def synthetic_batch(rng: np.random.Generator, batch_size: int, length: int, table) -> dict[str, np.ndarray]:
    """One batch of ``length + 1`` token sequences -> the train-step batch dict (targets shifted by one)."""
    next_tokens, probabilities = table
    sequences = np.zeros((batch_size, length + 1), np.int32)
    sequences[:, :2] = rng.integers(0, VOCAB, size=(batch_size, 2))
    for t in range(2, length + 1):
        previous, current = sequences[:, t - 2], sequences[:, t - 1]
        choice = (rng.random(batch_size)[:, None] > np.cumsum(probabilities[previous, current], -1)).sum(-1)
        sequences[:, t] = next_tokens[previous, current, np.minimum(choice, BRANCHING - 1)]
    span = length // 8
    for row in range(batch_size):  # copy an earlier span later on: in-context recall
        source = rng.integers(0, length // 2 - span)
        target = rng.integers(length // 2, length + 1 - span)
        sequences[row, target:target + span] = sequences[row, source:source + span]
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length))
    ones = np.ones((batch_size, length), np.int32)
    return {"tokens": sequences[:, :-1], "targets": sequences[:, 1:], "positions": positions,
            "segment_ids": ones, "loss_mask": ones}


class Trainer:
    """Train / evaluate one model on a one-device mesh with jaxlm's train and eval steps."""

    def __init__(self, model: DecoderLM, setup: Setup, steps: int):
        self.mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        optimizer_config = OptimizerConfig(learning_rate=setup.learning_rate, warmup_steps=steps // 10,
                                           weight_decay=0.0)
        params = nnx.state(model, nnx.Param)
        optimizer = make_optimizer(optimizer_config, params, steps)
        train_config = TrainConfig(steps=steps)
        self.graphdef, self.state, shardings = create_train_state(model, optimizer, self.mesh)
        self.train_step = make_train_step(self.graphdef, optimizer, self.mesh, train_config, shardings)
        self.eval_step = make_eval_step(self.graphdef, self.mesh, shardings)

    def train(self, batches) -> None:
        for batch in batches:
            self.state, _ = self.train_step(self.state, batch)

    def validation_loss(self, batches) -> float:
        totals = None
        for batch in batches:
            sums = self.eval_step(self.state, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        return float(metrics_from_sums(totals)["loss"])

    def model(self) -> DecoderLM:
        return nnx.merge(self.graphdef, self.state.params)


def batches(seed: int, count: int, setup: Setup, table) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{key: jnp.asarray(value) for key, value in synthetic_batch(rng, setup.batch_size, setup.seq_len,
                                                                       table).items()} for _ in range(count)]


def quality(setup: Setup, seeds: int) -> dict:
    """Validation loss of standard / parallel / ladder trained from scratch, per seed."""
    table = markov_table()
    validation = batches(10_000, setup.eval_batches, setup, table)
    results: dict[str, list[float]] = {"standard": [], "parallel": [], "ladder": []}
    for seed in range(seeds):
        train_batches = batches(seed, setup.steps, setup, table)
        for mode in results:
            model = DecoderLM(dataclasses.replace(setup.model, residual_mode=mode), rngs=nnx.Rngs(seed))
            trainer = Trainer(model, setup, setup.steps)
            trainer.train(train_batches)
            results[mode].append(trainer.validation_loss(validation))
            print(f"seed {seed} {mode:<9} validation loss {results[mode][-1]:.4f}", flush=True)
    summary = {mode: {"losses": losses, "mean": statistics.mean(losses),
                      "std": statistics.pstdev(losses)} for mode, losses in results.items()}
    gap = summary["ladder"]["mean"] / summary["standard"]["mean"] - 1
    summary["ladder_relative_gap"] = gap
    print(f"{'mode':<9} {'mean':>7} {'std':>7}")
    for mode in results:
        print(f"{mode:<9} {summary[mode]['mean']:>7.4f} {summary[mode]['std']:>7.4f}")
    print(f"ladder vs standard: {100 * gap:+.2f}% (target within 2%)")
    return summary


def convert(setup: Setup, ladder_layers: int, finetune_steps: int) -> dict:
    """Original vs zero-shot ladder conversion vs conversion + fine-tune (validation loss)."""
    table = markov_table()
    validation = batches(10_000, setup.eval_batches, setup, table)
    trainer = Trainer(DecoderLM(setup.model, rngs=nnx.Rngs(0)), setup, setup.steps)
    trainer.train(batches(0, setup.steps, setup, table))
    original = trainer.validation_loss(validation)
    converted = to_ladder(trainer.model(), ladder_layers)
    finetuner = Trainer(converted, setup, finetune_steps)
    zero_shot = finetuner.validation_loss(validation)
    finetuner.train(batches(1, finetune_steps, setup, table))
    finetuned = finetuner.validation_loss(validation)
    summary = {"original": original, "zero_shot_ladder": zero_shot, "finetuned_ladder": finetuned,
               "ladder_layers": ladder_layers, "num_layers": setup.model.num_layers, "finetune_steps": finetune_steps}
    for key in ("original", "zero_shot_ladder", "finetuned_ladder"):
        print(f"{key:<18} validation loss {summary[key]:.4f}")
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=("quality", "convert"))
    parser.add_argument("--smoke", action="store_true", help="a tiny config that runs in seconds")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
    parser.add_argument("--ladder-layers", type=int, default=2)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--output", default="", help="write the summary as JSON here")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    setup = dataclasses.replace(setup, steps=args.steps or setup.steps)
    if args.experiment == "quality":
        summary = quality(setup, args.seeds)
    else:
        summary = convert(setup, min(args.ladder_layers, setup.model.num_layers), args.finetune_steps)
    if args.output:
        with open(args.output, "w") as file:
            json.dump(summary, file, indent=2)
    return summary


if __name__ == "__main__":
    main()
