"""MQAR recall: Mamba-2 vs log-linear Mamba-2 and Gated DeltaNet vs log-linear Gated DeltaNet.

    python experiments/mqar/run.py --preset gpu --output experiments/mqar/results_gpu.json   # one H100, <= 12 min
    python experiments/mqar/run.py --preset cpu --only attention --seeds 1                    # the control, CPU
    python experiments/mqar/run.py --preset smoke --output /tmp/mqar_smoke.json               # seconds (the tests)

Protocol (Zoology-like; Arora et al. 2023, and REFERENCE.md §2, §8): one sequence length; every example is
``num_pairs`` key-value pairs followed by a query of every stored key (``jaxlm.tasks.mqar``), right-padded.
Each seed has a fixed training set whose examples take their pair count from the training mixture in turn;
each step draws a batch from it. The loss is the cross-entropy of the queried values only. After every
``steps_per_call`` steps the models predict a held-out set (fresh draws from the evaluation stream, the same
for every seed and model) and recall accuracy is measured per pair count: the fraction of queried values
whose argmax prediction is right.

Control: softmax attention with RoPE (``config.controls``, one width) trains first on the same data. Two-layer
attention solves MQAR at these sizes (Zoology, Fig. 2), so a control near chance means the recipe (steps,
schedule) or the pipeline is at fault, and the comparison rows then say nothing about the claim.

Parameter matching: the log-linear layer adds its λ projection ``W_λ [d_model, H·levels]`` and the
per-level scales ``[H, levels]``. The linear model gets the SwiGLU hidden width (3·d_model parameters per
unit per layer) that brings its count closest to the log-linear one; both counts are reported.

All models of one width and seed see the same batches and start from the same seed. The seeds train
together (``jaxlm.train.seeds``: parameters stacked, one vmapped AdamW step, many steps per jitted call), so each
(mixer, width) compiles once. Progress (steps done, minutes) is printed after every jitted call. Writes the
JSON results to ``--output`` and a plot next to it (same name, .png).
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

from jaxlm.experiment import config_from_args, experiment_parser, with_progress, write_results
from jaxlm.models import ModelConfig
from jaxlm.models.mixer_options import GatedDeltaNetOptions, Mamba2Options
from jaxlm.train import seeds as seed_batching
from jaxlm.tasks import EVAL_STREAM, TRAIN_STREAM, TaskSource
from jaxlm.tasks.mqar import MQARTask

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "mqar.py"
EVAL_SEED = 12345  # the held-out set is one draw of the evaluation stream, shared by every seed and model


def mqar_task(task_config, num_pairs: int) -> MQARTask:
    """The MQAR task with ``num_pairs`` pairs, each queried once, at the experiment's sequence length."""
    return MQARTask(seq_len=task_config.seq_len, num_pairs=num_pairs, num_queries=num_pairs,
                    num_keys=task_config.num_keys, num_values=task_config.num_values)


def check_task(task_config) -> None:
    """ValueError naming the field when a pair count does not fit the sequence or the eval set does not batch."""
    for field in ("train_pairs", "eval_pairs"):
        for num_pairs in getattr(task_config, field):
            if not 0 < 4 * num_pairs <= task_config.seq_len + 1 or num_pairs > task_config.num_keys:
                raise ValueError(f"task.{field} holds {num_pairs}: a pair count must be positive, at most "
                                 f"task.num_keys={task_config.num_keys} and fit 4 * pairs <= task.seq_len + 1 = "
                                 f"{task_config.seq_len + 1} tokens (pairs then one query per pair)")
    total = len(task_config.eval_pairs) * task_config.eval_examples
    if total % task_config.eval_batch_size:
        raise ValueError(f"task.eval_batch_size={task_config.eval_batch_size} must divide the held-out set of "
                         f"len(task.eval_pairs) * task.eval_examples = {total} examples")


def draw_examples(tasks: list[MQARTask], seed: int, stream: int,
                  count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` examples, example ``i`` from ``tasks[i % len(tasks)]`` (item ``i`` of its seeded stream).

    Returns ids ``[count, T + 1]`` int32, answer masks ``[count, T + 1]`` bool and the pair count of each row.
    """
    sources = [TaskSource(task, seed, stream) for task in tasks]
    items = [sources[i % len(tasks)][i] for i in range(count)]
    ids = np.stack([item[0] for item in items])  # [N, T + 1]
    answer_mask = np.stack([item[1] for item in items])  # [N, T + 1]
    pairs = np.array([tasks[i % len(tasks)].num_pairs for i in range(count)])  # [N]
    return ids, answer_mask, pairs


def held_out_set(task_config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``eval_examples`` held-out examples per pair count of ``eval_pairs``, grouped by pair count."""
    sets = [draw_examples([mqar_task(task_config, p)], EVAL_SEED, EVAL_STREAM, task_config.eval_examples)
            for p in task_config.eval_pairs]
    return tuple(np.concatenate(parts) for parts in zip(*sets))


def batch_chunks(train_sets: list[tuple[np.ndarray, np.ndarray]], steps: int, chunk_steps: int, batch_size: int,
                 seeds: list[int]):
    """Chunks of ``chunk_steps`` training batches ``{"tokens", "targets", "loss_mask"}: [K, S, B, T]``.

    Seed ``s`` draws rows of its own training set uniformly (with replacement) from ``default_rng([s, 1])``;
    inputs are ``ids[:-1]``, targets ``ids[1:]``, and only the queried values (``answer_mask[1:]``) are scored.
    """
    rows = [np.random.default_rng([seed, 1]).integers(0, len(ids), size=(steps, batch_size))
            for seed, (ids, _) in zip(seeds, train_sets)]  # S x [steps, B]
    for start in range(0, steps, chunk_steps):
        ids = np.stack([train_ids[r[start:start + chunk_steps]] for (train_ids, _), r in zip(train_sets, rows)],
                       axis=1)  # [K, S, B, T + 1]
        mask = np.stack([train_mask[r[start:start + chunk_steps]] for (_, train_mask), r in zip(train_sets, rows)],
                        axis=1)  # [K, S, B, T + 1]
        yield {"tokens": ids[..., :-1], "targets": ids[..., 1:], "loss_mask": mask[..., 1:].astype(np.float32)}


def recall_accuracy(predictions: np.ndarray, ids: np.ndarray, answer_mask: np.ndarray, pairs: np.ndarray,
                    pair_counts) -> np.ndarray:
    """Per seed and pair count, the fraction of queried values predicted exactly.

    ``predictions [S, N, T]`` are argmax tokens for inputs ``ids[:, :-1]``; a query-value position t is
    right when ``predictions[s, n, t] == ids[n, t + 1]`` and ``answer_mask[n, t + 1]``. Returns ``[S, P]``
    with ``acc[s, p] = Σ right / Σ answer positions`` over the rows with ``pair_counts[p]`` pairs.
    """
    targets, scored = ids[:, 1:], answer_mask[:, 1:]  # [N, T]
    right = (predictions == targets[None]) & scored[None]  # [S, N, T]
    accuracy = np.zeros((predictions.shape[0], len(pair_counts)))
    for index, num_pairs in enumerate(pair_counts):
        rows = pairs == num_pairs
        accuracy[:, index] = right[:, rows].sum(axis=(1, 2)) / max(scored[rows].sum(), 1)
    return accuracy


def model_config(config, mixer: str, width: int, mlp_dim: int, vocab_size: int) -> ModelConfig:
    """The decoder of one (mixer, width) with SwiGLU hidden width ``mlp_dim``."""
    model = config.model
    return ModelConfig(
        vocab_size=vocab_size, d_model=width, num_layers=model.num_layers, num_heads=model.num_heads,
        num_kv_heads=model.num_heads, mlp_dim=mlp_dim, max_seq_len=config.task.seq_len, mixer=mixer, scan_layers=True,
        mamba2=Mamba2Options(state_dim=model.mamba2_state_dim, head_dim=model.mamba2_head_dim,
                             expand=model.mamba2_expand, chunk_size=model.chunk_size),
        gated_deltanet=GatedDeltaNetOptions(chunk_size=model.chunk_size))


def matched_configs(config, linear: str, loglinear: str, width: int, vocab_size: int) -> dict[str, ModelConfig]:
    """Configs of the linear and log-linear mixer at ``width`` with (near) equal parameter counts.

    The log-linear model has ``mlp_dim = mlp_ratio · width``; the linear one ``mlp_dim + round(Δ / (3 ·
    width · num_layers))`` with Δ the log-linear model's extra parameters (a SwiGLU hidden unit costs
    3·width parameters per layer).
    """
    base_mlp = config.model.mlp_ratio * width
    loglinear_config = model_config(config, loglinear, width, base_mlp, vocab_size)
    extra = seed_batching.parameter_count(loglinear_config) - seed_batching.parameter_count(
        model_config(config, linear, width, base_mlp, vocab_size))
    linear_mlp = base_mlp + round(extra / (3 * width * config.model.num_layers))
    return {linear: model_config(config, linear, width, linear_mlp, vocab_size), loglinear: loglinear_config}


def control_configs(config, vocab_size: int) -> dict[str, ModelConfig]:
    """The control models: every mixer of ``config.controls`` at ``model.control_width`` (SwiGLU ``mlp_ratio ·
    width``, no parameter matching).

    A control is a mixer known to solve MQAR at this size (2-layer softmax attention with RoPE; Arora et al.
    2023, Fig. 2). It checks the recipe and the pipeline: if it stays near chance, the comparison rows say
    nothing about the claim.
    """
    width = config.model.control_width
    return {mixer: model_config(config, mixer, width, config.model.mlp_ratio * width, vocab_size)
            for mixer in config.controls}


def train_and_evaluate(model_cfg: ModelConfig, config, seeds: list[int], train_sets, held_out) -> dict:
    """Train ``model_cfg`` for every seed at once; held-out recall per pair count after every call."""
    train = config.train
    chunk_steps = seed_batching.steps_per_call(train.steps, train.steps_per_call)
    start = time.perf_counter()
    model = seed_batching.build_seed_models(model_cfg, seeds)
    trainer = seed_batching.make_trainer(model, train)
    eval_ids, eval_mask, eval_pairs = held_out
    eval_tokens = eval_ids[:, :-1].reshape(-1, config.task.eval_batch_size, config.task.seq_len)  # [E, Be, T]
    chunks = with_progress(batch_chunks(train_sets, train.steps, chunk_steps, train.batch_size, seeds),
                           f"{model_cfg.mixer} d={model_cfg.d_model}", train.steps, chunk_steps)
    losses, predictions = seed_batching.train_seeds(model, trainer, chunks, eval_tokens)
    curve = []
    for call, prediction in enumerate(predictions):
        prediction = seed_batching.predictions_by_seed(prediction)  # [S, N, T]
        accuracy = recall_accuracy(prediction, eval_ids, eval_mask, eval_pairs, config.task.eval_pairs)  # [S, P]
        curve.append({"step": (call + 1) * chunk_steps, "accuracy": accuracy.tolist()})
    final = np.array(curve[-1]["accuracy"])  # [S, P]
    return {
        "mixer": model_cfg.mixer, "width": model_cfg.d_model, "mlp_dim": model_cfg.mlp_dim,
        "num_params": model.num_params, "num_params_without_embeddings": model.num_params_without_embeddings,
        "seeds": seeds, "eval_pairs": list(config.task.eval_pairs),
        "accuracy": final.tolist(), "mean_accuracy": final.mean(axis=0).tolist(),
        "std_accuracy": final.std(axis=0).tolist(),
        "final_loss": losses[-max(1, chunk_steps // 10):].mean(axis=0).tolist(), "curve": curve,
        "wall_s": time.perf_counter() - start,
    }


def results_table(runs: list[dict], eval_pairs) -> str:
    """Markdown table: one row per (width, mixer), recall accuracy mean ± std over seeds per pair count."""
    header = "| width | mixer | params | " + " | ".join(f"{p} pairs" for p in eval_pairs) + " | mean |"
    lines = [header, "|" + "---|" * (4 + len(eval_pairs))]
    for run in runs:
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(run["mean_accuracy"], run["std_accuracy"])]
        mean = 100 * float(np.mean(run["mean_accuracy"]))
        mixer = f"{run['mixer']} (control)" if run.get("control") else run["mixer"]
        lines.append(f"| {run['width']} | {mixer} | {run['num_params']:,} | " + " | ".join(cells)
                     + f" | {mean:.1f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: pathlib.Path) -> None:
    """Recall accuracy vs pair count, one panel per width, mean ± std over seeds for every mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({run["width"] for run in runs})
    figure, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4), squeeze=False)
    for axis, width in zip(axes[0], widths):
        for run in (r for r in runs if r["width"] == width):
            style = ":" if run.get("control") else "-" if run["mixer"].startswith("loglinear") else "--"
            role = ", control" if run.get("control") else ""
            axis.errorbar(run["eval_pairs"], run["mean_accuracy"], yerr=run["std_accuracy"], linestyle=style,
                          marker="o", capsize=3, label=f"{run['mixer']} ({run['num_params']:,}{role})")
        axis.set(xscale="log", xlabel="key-value pairs", ylabel="recall accuracy", title=f"d_model = {width}",
                 ylim=(0, 1.02))
        axis.set_xticks(runs[0]["eval_pairs"], [str(p) for p in runs[0]["eval_pairs"]])
        axis.minorticks_off()
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def select_mixers(config, names) -> None:
    """Keep only the controls and the (linear, log-linear) pairs named by ``names`` (a pair by its linear mixer).

    Raises ValueError naming the unknown names and the allowed ones.
    """
    known = list(config.controls) + [linear for linear, _ in config.mixer_pairs]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"--only {unknown}: each name must be a control or the linear mixer of a pair, "
                         f"one of {known}")
    config.controls = tuple(mixer for mixer in config.controls if mixer in names)
    config.mixer_pairs = tuple(pair for pair in config.mixer_pairs if pair[0] in names)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.split("\n\n")[0], DEFAULT_CONFIG, "results JSON path (the plot goes next to it, .png)")
    parser.add_argument("--seed-batching", default="", choices=("", *seed_batching.SEED_BATCHING),
                        help="run the seeds of one call one after the other (map) or batched (vmap); '': the preset's")
    parser.add_argument("--only", nargs="+", default=(), metavar="MIXER",
                        help="run only these controls (e.g. attention) and the pairs whose linear mixer is named "
                             "(e.g. mamba2); default: every control and pair")
    parser.add_argument("--widths", nargs="+", type=int, default=(), metavar="D",
                        help="model widths of the compared pairs (default: the preset's)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    if args.only:
        select_mixers(config, args.only)
    if args.widths:
        config.model.widths = tuple(args.widths)
    if args.seed_batching:
        config.train.seed_batching = args.seed_batching
    check_task(config.task)
    seeds = list(range(config.seeds))
    start = time.perf_counter()
    train_tasks = [mqar_task(config.task, p) for p in config.task.train_pairs]
    train_sets = [draw_examples(train_tasks, seed, TRAIN_STREAM, config.task.train_examples)[:2] for seed in seeds]
    held_out = held_out_set(config.task)
    vocab_size = train_tasks[0].tokenizer.vocab_size
    print(f"data: {len(seeds)} x {config.task.train_examples} training + {len(held_out[0])} held-out examples "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    model_configs = list(control_configs(config, vocab_size).values())  # the controls first: they check the recipe
    for linear, loglinear in config.mixer_pairs:
        for width in config.model.widths:
            model_configs.extend(matched_configs(config, linear, loglinear, width, vocab_size).values())
    runs = []
    for model_cfg in model_configs:
        run = train_and_evaluate(model_cfg, config, seeds, train_sets, held_out)
        run["control"] = model_cfg.mixer in config.controls
        runs.append(run)
        print(f"{model_cfg.mixer:<26} d={model_cfg.d_model:<4} params {run['num_params']:>9,} mean recall "
              f"{100 * np.mean(run['mean_accuracy']):5.1f}%  loss {np.mean(run['final_loss']):.3f}  "
              f"wall {run['wall_s']:.1f} s", flush=True)
    results = {"preset": args.preset, "config": config.to_dict(), "runs": runs,
               "total_wall_s": time.perf_counter() - start}
    table = results_table(runs, config.task.eval_pairs)
    print(f"\nrecall accuracy (%), mean ± std over {len(seeds)} seeds; total wall {results['total_wall_s']:.1f} s")
    print(table)
    write_results(results, args.output, lambda path: plot(runs, path))
    return results


if __name__ == "__main__":
    main()
