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

On machines that run commands for a limited time, split the run: ``--phase finetune --model-dir DIR`` saves
the fine-tuned parameters (``model-NN.npz`` shards in the compute dtype) and the fine-tuning record; ``--phase evaluate --model-dir
DIR --settings ft,ttt`` loads them and scores only the listed settings (``SETTINGS``).
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
import jax.numpy as jnp
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
    "gpu": Preset(_model(384, 6, 6, 1024, "bfloat16"), ft_steps=3000, ft_batch=64, ft_learning_rate=1e-3, min_side=3,
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


# Settings by key (``--settings``): the table's row name for each. "ttt" also gives the flat-voting row.
SETTINGS = {"ft": "FT only", "ttt": "FT + TTT", "noaug": "FT + TTT, no augmentation", "shared": "FT + shared adapter"}
ABLATIONS = ("noaug", "shared")


def evaluate_settings(model: nnx.Module, tasks: list[ArcTask], ttt: TTTConfig,
                      settings: tuple[str, ...]) -> dict[str, float]:
    """Tasks solved (pass@2, fractional for multi-test tasks) per setting, in ``SETTINGS`` order."""
    results = {}
    if "ft" in settings:
        results[SETTINGS["ft"]] = score(evaluate(model, tasks, ttt, "ft", progress=True))
    if "ttt" in settings:
        per_task = evaluate(model, tasks, ttt, "ttt", progress=True)
        results[SETTINGS["ttt"]] = score(per_task)
        results["FT + TTT, flat voting"] = score(per_task, "flat")
    if "noaug" in settings:
        results[SETTINGS["noaug"]] = score(evaluate(model, tasks, dataclasses.replace(ttt, augment=False), "ttt"))
    if "shared" in settings:
        results[SETTINGS["shared"]] = score(evaluate(model, tasks, ttt, "shared"))
    return results


def finetune(preset: Preset, seed: int) -> tuple[DecoderLM, dict]:
    """A model fine-tuned on the training families: ``(model, {"finetune_final", "finetune_seconds"})``."""
    started = time.time()
    train_families, _ = family_split(preset.num_held_out, seed)
    rng = np.random.default_rng(seed)
    arc_train = fitting_arc_tasks(load_arc_tasks("training"), preset) if preset.arc_train_fraction > 0 else []
    model = DecoderLM(preset.model, rngs=nnx.Rngs(seed))
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    optimizer = OptimizerConfig(learning_rate=preset.ft_learning_rate, warmup_steps=max(1, preset.ft_steps // 20),
                                weight_decay=0.01)
    history = fit(model, finetune_batches(preset, train_families, arc_train, rng), steps=preset.ft_steps,
                  optimizer=optimizer, mesh=mesh, progress=False, log_every=max(1, preset.ft_steps // 10)).history
    return model, {"finetune_final": history[-1], "finetune_seconds": round(time.time() - started, 1)}


MAX_SHARD_BYTES = 12 * 2**20  # model files stay small enough to move between machines one by one


def save_model(model: DecoderLM, directory: Path, record: dict) -> None:
    """Parameters in the model's compute dtype (what its matmuls read) as ``model-NN.npz`` shards of at most
    ``MAX_SHARD_BYTES``; bfloat16 arrays are stored as their uint16 bit patterns. ``finetune.json``: the
    fine-tuning record and the shard names."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = jnp.dtype(model.config.compute_dtype)
    shards, current, size = [], {}, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        array = np.asarray(jnp.asarray(leaf, dtype))
        if current and size + array.nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[jax.tree_util.keystr(path)] = array.view(np.uint16) if dtype == jnp.bfloat16 else array
        size += array.nbytes
    shards.append(current)
    names = [f"model-{index:02d}.npz" for index in range(len(shards))]
    for name, shard in zip(names, shards):
        np.savez(directory / name, **shard)
    (directory / "finetune.json").write_text(json.dumps({**record, "shards": names, "dtype": dtype.name}, indent=2))


def load_model(preset: Preset, directory: Path) -> tuple[DecoderLM, dict]:
    """The model and record ``save_model`` wrote; a clear error when files are missing or do not match."""
    record_path = directory / "finetune.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"no fine-tuned model at {record_path}: run --phase finetune --model-dir "
                                f"{directory} first")
    record = json.loads(record_path.read_text())
    saved = {}
    for name in record.pop("shards"):
        with np.load(directory / name) as shard:
            saved.update({key: shard[key] for key in shard.files})
    stored_dtype = jnp.dtype(record.pop("dtype"))
    model = DecoderLM(preset.model, rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    differing = sorted(set(names) ^ set(saved))
    if differing:
        raise ValueError(f"{directory} does not hold this preset's model (parameters differ: {differing[:4]})")
    arrays = [(saved[name].view(jnp.bfloat16) if stored_dtype == jnp.bfloat16 else saved[name]).astype(leaf.dtype)
              for name, (_, leaf) in zip(names, leaves)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, arrays))
    return model, record


def evaluate_model(model: nnx.Module, preset: Preset, seed: int, settings: tuple[str, ...]) -> dict:
    """Held-out families (every setting asked for) and, when the preset has them, ARC-1 evaluation tasks
    (the non-ablation settings asked for)."""
    _, held_out = family_split(preset.num_held_out, seed)
    eval_rng = np.random.default_rng(seed + 1)
    held_out_tasks = [generate_task(family, eval_rng, num_demos=3, min_side=preset.min_side, max_side=preset.max_side)
                      for family in held_out for _ in range(preset.tasks_per_family)]
    results = {"held_out_families": held_out, "num_held_out_tasks": len(held_out_tasks),
               "held_out": evaluate_settings(model, held_out_tasks, preset.ttt, settings)}
    arc_settings = tuple(setting for setting in settings if setting not in ABLATIONS)
    if preset.arc_eval_tasks and arc_settings:
        arc_eval = fitting_arc_tasks(load_arc_tasks("evaluation"), preset)
        chosen = arc_eval[: preset.arc_eval_tasks]
        results.update(arc1_eval_fitting=len(arc_eval), arc1_eval_scored=len(chosen),
                       arc1_eval=evaluate_settings(model, chosen, preset.ttt, arc_settings))
    return results


def run(preset_name: str, seed: int = 0, phase: str = "all", model_dir: Path | None = None,
        settings: tuple[str, ...] = tuple(SETTINGS), overrides: dict | None = None) -> dict:
    """One phase of the experiment (``all``: fine-tune, then score every setting); ``overrides`` replaces
    preset fields (None values are ignored)."""
    preset = PRESETS[preset_name]
    overrides = {name: value for name, value in (overrides or {}).items() if value is not None}
    preset = dataclasses.replace(preset, **overrides)
    started = time.time()
    if phase == "evaluate":
        model, record = load_model(preset, model_dir)
    else:
        model, record = finetune(preset, seed)
        if model_dir is not None:
            save_model(model, model_dir, record)
    results = {"preset": preset_name, **record}
    if phase != "finetune":
        results.update(evaluate_model(model, preset, seed, settings))
    results["total_seconds"] = round(time.time() - started, 1)
    return results


def markdown_table(results: dict) -> str:
    """Rows: settings; columns: held-out families (and ARC-1 evaluation tasks when scored)."""
    if "held_out" not in results:
        return f"fine-tuned: {results['finetune_final']}"
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
    parser.add_argument("--phase", choices=("all", "finetune", "evaluate"), default="all")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where --phase finetune saves the model and --phase evaluate loads it")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated settings to score, of {', '.join(SETTINGS)}")
    for field in ("ft_steps", "tasks_per_family", "arc_eval_tasks"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None, help=f"override the preset's {field}")
    args = parser.parse_args(argv)
    settings = tuple(name for name in args.settings.split(",") if name)
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown or not settings:
        parser.error(f"--settings: unknown {unknown or '(empty)'}; choose from {', '.join(SETTINGS)}")
    if args.phase != "all" and args.model_dir is None:
        parser.error(f"--phase {args.phase} needs --model-dir")
    results = run("smoke" if args.smoke else args.preset, args.seed, args.phase, args.model_dir, settings,
                  {"ft_steps": args.ft_steps, "tasks_per_family": args.tasks_per_family,
                   "arc_eval_tasks": args.arc_eval_tasks})
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
