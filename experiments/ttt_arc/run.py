"""FT-only vs FT + test-time training on held-out generated ARC-like task families and on ARC-1
evaluation tasks that fit the small model's context (Akyürek et al. 2024; REFERENCE.md section 7).

1. Fine-tune a small decoder from scratch (``jaxlm.train.sft.fit``) on generated tasks of the training
   families (``jaxlm.tasks.arc_generator``), each randomly augmented (grid transform, colour map, demo order),
   loss on the outputs of demos 2…K and of the test.
2. Score held-out families (compositions never seen in fine-tuning) and the fitting ARC-1 evaluation tasks at
   pass@2 with ``jaxlm.train.ttt.evaluate``: FT only; FT + TTT (fresh LoRA per task, augmented
   leave-one-out data); ablations: TTT without augmentation, one shared adapter for all tasks, flat instead
   of hierarchical voting (on the same TTT predictions).

    python experiments/ttt_arc/run.py --preset gpu      # one GPU, ~30 min
    python experiments/ttt_arc/run.py --preset cpu      # reduced CPU run (the README table)
    python experiments/ttt_arc/run.py --smoke           # seconds: exercised by the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.parallel.mesh import make_mesh
from jaxlm.tasks.arc import (PAD, VOCAB_SIZE, ArcTask, answer_length, load_arc_tasks, task_length,
                             training_example)
from jaxlm.tasks.arc_augment import ALL_TRANSFORMS, GEOMETRIC, augment_task, grid_transform, random_colour_permutation
from jaxlm.tasks.arc_generator import family_split, generate_task
from jaxlm.train.config import MeshConfig, OptimizerConfig
from jaxlm.train.lora import LoraConfig
from jaxlm.train.sft import fit, sft_batch
from jaxlm.train.ttt import TTTConfig, evaluate


@dataclasses.dataclass(frozen=True)
class Preset:
    """One run's sizes: the model, fine-tuning, the evaluation sets and TTT."""

    model: ModelConfig
    ft_steps: int
    ft_batch: int
    ft_learning_rate: float
    min_side: int
    max_side: int
    num_held_out: int  # held-out families
    tasks_per_family: int
    arc_eval_tasks: int  # at most this many fitting ARC-1 evaluation tasks (0: skip)
    arc_train_fraction: float  # share of fine-tuning examples from fitting ARC-1 training tasks
    ttt: TTTConfig


def _model(d_model: int, layers: int, heads: int, max_seq_len: int, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB_SIZE, d_model=d_model, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, mlp_dim=4 * d_model, max_seq_len=max_seq_len, compute_dtype=dtype)


def _ttt(rank: int, lr: float, steps: int, seq_len: int, max_new_tokens: int, **kwargs) -> TTTConfig:
    return TTTConfig(lora=LoraConfig(rank=rank, alpha=16.0), steps=steps, seq_len=seq_len,
                     optimizer=OptimizerConfig(learning_rate=lr, weight_decay=0.01, b2=0.999),
                     max_new_tokens=max_new_tokens, **kwargs)


PRESETS = {
    "smoke": Preset(_model(16, 1, 2, 128), ft_steps=2, ft_batch=4, ft_learning_rate=3e-3, min_side=2,
                    max_side=3, num_held_out=2, tasks_per_family=1, arc_eval_tasks=0, arc_train_fraction=0.0,
                    ttt=_ttt(2, 1e-3, 2, 127, 24, max_items=4, inference_transforms=("identity", "transpose"),
                             demo_orders=1)),
    "cpu": Preset(_model(96, 3, 4, 256), ft_steps=1000, ft_batch=16, ft_learning_rate=2e-3, min_side=2,
                  max_side=4, num_held_out=4, tasks_per_family=5, arc_eval_tasks=0, arc_train_fraction=0.0,
                  ttt=_ttt(8, 3e-3, 24, 160, 48, max_items=48, batch_size=4, train_transforms=GEOMETRIC)),
    "gpu": Preset(_model(384, 8, 6, 1024, "bfloat16"), ft_steps=4000, ft_batch=64, ft_learning_rate=1e-3, min_side=3,
                  max_side=6, num_held_out=8, tasks_per_family=10, arc_eval_tasks=40, arc_train_fraction=0.2,
                  ttt=_ttt(32, 1e-3, 48, 1023, 128, max_items=250, batch_size=4, copies_per_transform=4)),
}


def random_augmentation(task: ArcTask, rng: np.random.Generator) -> ArcTask:
    """``task`` through a random transform of ``ALL_TRANSFORMS`` (half the time identity), a random colour
    map and demo order; the task itself when the transform would make a grid too large."""
    name = "identity" if rng.random() < 0.5 else ALL_TRANSFORMS[rng.integers(len(ALL_TRANSFORMS))]
    augmented = augment_task(task, grid_transform(name), random_colour_permutation(rng),
                             rng.permutation(len(task.demos)).tolist())
    return task if augmented is None else augmented


def finetune_batches(preset: Preset, families: list[str], arc_tasks: list[ArcTask],
                     rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of augmented tasks: a generated task of a random training family (2–4 demos) or,
    with probability ``arc_train_fraction``, a fitting ARC-1 training task; examples that do not fit are
    redrawn."""
    seq_len = preset.model.max_seq_len - 1
    while True:
        examples = []
        while len(examples) < preset.ft_batch:
            if arc_tasks and rng.random() < preset.arc_train_fraction:
                task = arc_tasks[rng.integers(len(arc_tasks))]
            else:
                task = generate_task(families[rng.integers(len(families))], rng, num_demos=int(rng.integers(2, 5)),
                                     min_side=preset.min_side, max_side=preset.max_side)
            task = random_augmentation(task, rng)
            tokens, learn = training_example(task.demos, task.tests[0])
            if len(tokens) <= seq_len + 1:
                examples.append((tokens, learn))
        yield sft_batch(examples, seq_len, PAD)


def fitting_arc_tasks(tasks: list[ArcTask], preset: Preset) -> list[ArcTask]:
    """Tasks whose full sequence fits the model and whose answers fit the generation budget."""
    return [task for task in tasks
            if all(task_length(task, i) <= preset.model.max_seq_len for i in range(len(task.tests)))
            and all(answer_length(out.shape) <= preset.ttt.max_new_tokens for _, out in task.tests)]


def score(outcomes, voting: str = "hierarchical") -> float:
    return float(sum(outcome.scores[voting] for outcome in outcomes))


def evaluate_all_settings(model: nnx.Module, tasks: list[ArcTask], ttt: TTTConfig,
                          with_ablations: bool) -> dict[str, float]:
    """Tasks solved (pass@2, fractional for multi-test tasks) per setting."""
    results = {"FT only": score(evaluate(model, tasks, ttt, "ft"))}
    per_task = evaluate(model, tasks, ttt, "ttt")
    results["FT + TTT"] = score(per_task)
    if with_ablations:
        results["FT + TTT, flat voting"] = score(per_task, "flat")
        plain = dataclasses.replace(ttt, augment=False)
        results["FT + TTT, no augmentation"] = score(evaluate(model, tasks, plain, "ttt"))
        results["FT + shared adapter"] = score(evaluate(model, tasks, ttt, "shared"))
    return results


def run(preset_name: str, seed: int = 0) -> dict:
    preset = PRESETS[preset_name]
    started = time.time()
    train_families, held_out = family_split(preset.num_held_out, seed)
    rng = np.random.default_rng(seed)
    arc_train = fitting_arc_tasks(load_arc_tasks("training"), preset) if preset.arc_train_fraction > 0 else []
    model = DecoderLM(preset.model, rngs=nnx.Rngs(seed))
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    optimizer = OptimizerConfig(learning_rate=preset.ft_learning_rate, warmup_steps=max(1, preset.ft_steps // 20),
                                weight_decay=0.01)
    history = fit(model, finetune_batches(preset, train_families, arc_train, rng), steps=preset.ft_steps,
                  optimizer=optimizer, mesh=mesh, progress=False, log_every=max(1, preset.ft_steps // 10)).history
    ft_seconds = time.time() - started
    eval_rng = np.random.default_rng(seed + 1)
    held_out_tasks = [generate_task(family, eval_rng, num_demos=3, min_side=preset.min_side, max_side=preset.max_side)
                      for family in held_out for _ in range(preset.tasks_per_family)]
    results = {"preset": preset_name, "held_out_families": held_out, "num_held_out_tasks": len(held_out_tasks),
               "finetune_final": history[-1], "finetune_seconds": round(ft_seconds, 1),
               "held_out": evaluate_all_settings(model, held_out_tasks, preset.ttt, with_ablations=True)}
    if preset.arc_eval_tasks:
        arc_eval = fitting_arc_tasks(load_arc_tasks("evaluation"), preset)
        results["arc1_eval_fitting"] = len(arc_eval)
        chosen = arc_eval[: preset.arc_eval_tasks]
        results["arc1_eval_scored"] = len(chosen)
        results["arc1_eval"] = evaluate_all_settings(model, chosen, preset.ttt, with_ablations=False)
    results["total_seconds"] = round(time.time() - started, 1)
    return results


def markdown_table(results: dict) -> str:
    """Rows: settings; columns: held-out families (and ARC-1 evaluation tasks when scored)."""
    n = results["num_held_out_tasks"]
    header = f"| setting | held-out families (of {n}) |"
    rule = "|---|---|"
    has_arc = "arc1_eval" in results
    if has_arc:
        header += f" ARC-1 eval fitting (of {results['arc1_eval_scored']}) |"
        rule += "---|"
    rows = [header, rule]
    for setting, solved in results["held_out"].items():
        row = f"| {setting} | {solved:g} |"
        if has_arc:
            arc = results["arc1_eval"].get(setting)
            row += f" {'' if arc is None else f'{arc:g}'} |"
        rows.append(row)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--smoke", action="store_true", help="the seconds-long preset used by the tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results.json and table.md here")
    args = parser.parse_args(argv)
    results = run("smoke" if args.smoke else args.preset, args.seed)
    table = markdown_table(results)
    print(json.dumps(results, indent=2))
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "table.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
