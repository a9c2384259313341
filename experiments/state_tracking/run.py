"""A5 state tracking: accuracy vs number of layers for PaTH attention and softmax attention with RoPE.

    python experiments/state_tracking/run.py --preset gpu --output experiments/state_tracking/results_gpu.json
    python experiments/state_tracking/run.py --preset cpu --output experiments/state_tracking/results_cpu.json
    python experiments/state_tracking/run.py --preset smoke --output /tmp/state_tracking_smoke.json  # the tests

Task (``jaxlm.tasks.permutation``; Merrill et al. 2024; REFERENCE.md §3, §8): the model reads a word of
uniform A5 elements ``g_1 … g_T`` and predicts at every position the running product ``p_t = p_{t-1} ∘ g_t``
(a labelled sequence: the products are never inputs). Every step trains on fresh words; the held-out set is
one fixed draw of full-length words shared by every seed and model. Training follows a length curriculum
(``task.curriculum``): stage k scores only the first ``n_k`` products, short words first, up to the full
length. Reported per (mixer, layers), mean ± std over seeds:

- per-position accuracy ``acc_t`` = fraction of held-out words whose product at position t is right;
- token accuracy = mean of ``acc_t`` over positions; sequence accuracy = fraction of words right at every
  position; tracked length = the number of leading positions with ``acc_t ≥ 0.9``.

Chance is 1/60 per position, except position 1 whose product is its input. The seeds of one (mixer, layers)
train in one compiled program (``jaxlm.train.seeds``), layers under ``scan_layers``; progress (steps done,
minutes) is printed after every jitted call. Writes the JSON results to ``--output`` and a plot next to it
(same name, .png).
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

from jaxlm.experiment import config_from_args, experiment_parser, with_progress, write_results
from jaxlm.models import ModelConfig
from jaxlm.models.mixer_options import PaTHOptions
from jaxlm.train import seeds as seed_batching
from jaxlm.tasks.permutation import PermutationTask

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "state_tracking.py"
EVAL_SEED = 12345  # the held-out words: one draw, shared by every seed and model
TRACKED_ACCURACY = 0.9  # a position counts as tracked when its accuracy reaches this


def check_curriculum(curriculum, seq_len: int) -> None:
    """ValueError naming ``task.curriculum`` unless it is ``(length, fraction)`` stages with increasing
    lengths in ``[1, seq_len]``, the last equal to ``seq_len``, and positive fractions summing to 1."""
    stages = [tuple(stage) for stage in curriculum]
    lengths = [length for length, _ in stages]
    fractions = [fraction for _, fraction in stages]
    valid = (stages and all(len(stage) == 2 for stage in stages) and lengths == sorted(set(lengths))
             and 0 < lengths[0] and lengths[-1] == seq_len and all(f > 0 for f in fractions)
             and abs(sum(fractions) - 1) < 1e-6)
    if not valid:
        raise ValueError(f"task.curriculum={curriculum!r}: expected (length, fraction) stages with increasing "
                         f"lengths, the last equal to task.seq_len={seq_len}, and positive fractions summing to 1")


def scored_lengths(curriculum, num_calls: int, seq_len: int) -> list[int]:
    """The scored prefix length of every jitted call: call ``c`` is in the first stage ``k`` whose cumulative
    fraction ``f_1 + … + f_k`` (times ``num_calls``, rounded to whole calls) exceeds ``c``; ``seq_len`` for
    every call without a curriculum (empty or None)."""
    if not curriculum:
        return [seq_len] * num_calls
    bounds = np.cumsum([fraction for _, fraction in curriculum]) * num_calls  # [stages] end call of each stage
    stage_of_call = np.searchsorted(np.round(bounds), np.arange(num_calls), side="right")  # [calls]
    lengths = [length for length, _ in curriculum]
    return [lengths[min(stage, len(lengths) - 1)] for stage in stage_of_call]


def batch_chunks(task: PermutationTask, steps: int, chunk_steps: int, batch_size: int, seeds: list[int],
                 curriculum=None):
    """Chunks of ``chunk_steps`` batches ``{"tokens", "targets", "loss_mask"}: [K, S, B, T]`` of fresh words.

    Seed ``s`` draws its words from ``default_rng([s, 1])``. Without a curriculum every position is scored;
    with one, a call scores the first ``n`` positions, ``n`` from ``scored_lengths``. For a causal model the
    loss on the prefix ``p_1 … p_n`` of a length-T word is the loss on the word ``g_1 … g_n``: training on
    short words first, without a new compiled shape per stage.
    """
    lengths = scored_lengths(curriculum, steps // chunk_steps, task.seq_len)
    rngs = [np.random.default_rng([seed, 1]) for seed in seeds]
    positions = np.arange(task.seq_len)  # [T]
    for length in lengths:
        words = [task.sample_batch(rng, chunk_steps * batch_size) for rng in rngs]  # S x ([K·B, T], [K·B, T])
        tokens = np.stack([w[0] for w in words], axis=0).reshape(len(seeds), chunk_steps, batch_size, -1)
        targets = np.stack([w[1] for w in words], axis=0).reshape(len(seeds), chunk_steps, batch_size, -1)
        loss_mask = np.broadcast_to(positions < length, tokens.shape).astype(np.float32)  # [S, K, B, T]
        yield {"tokens": np.swapaxes(tokens, 0, 1), "targets": np.swapaxes(targets, 0, 1),
               "loss_mask": np.swapaxes(loss_mask, 0, 1)}  # [K, S, B, T]


def tracking_accuracy(predictions: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracies of predicted products ``[S, N, T]`` against the true products ``targets [N, T]``.

    ``per_position [S, T]``: ``acc_t`` = mean over words of ``[pred_t == p_t]``; ``token [S]``: its mean over
    positions; ``sequence [S]``: fraction of words right at every position; ``tracked_length [S]``: number of
    leading positions with ``acc_t >= TRACKED_ACCURACY``.
    """
    right = predictions == targets[None]  # [S, N, T]
    per_position = right.mean(axis=1)  # [S, T]
    below = per_position < TRACKED_ACCURACY  # [S, T]
    tracked = np.where(below.any(axis=1), below.argmax(axis=1), per_position.shape[1])  # [S]
    return {"per_position": per_position, "token": per_position.mean(axis=1),
            "sequence": right.all(axis=2).mean(axis=1), "tracked_length": tracked}


def model_config(config, mixer: str, num_layers: int, vocab_size: int) -> ModelConfig:
    """The decoder of one (mixer, depth): RoPE attention or PaTH (no RoPE), the same widths."""
    model = config.model
    return ModelConfig(
        vocab_size=vocab_size, d_model=model.d_model, num_layers=num_layers, num_heads=model.num_heads,
        num_kv_heads=model.num_heads, mlp_dim=model.mlp_ratio * model.d_model, max_seq_len=config.task.seq_len,
        mixer=mixer, scan_layers=True, path=PaTHOptions(block_size=model.path_block_size))


def train_and_evaluate(model_cfg: ModelConfig, config, seeds: list[int], task: PermutationTask,
                       held_out: tuple[np.ndarray, np.ndarray]) -> dict:
    """Train ``model_cfg`` for every seed; held-out tracking accuracy after every call."""
    train = config.train
    chunk_steps = seed_batching.steps_per_call(train.steps, train.steps_per_call)
    start = time.perf_counter()
    model = seed_batching.build_seed_models(model_cfg, seeds)
    trainer = seed_batching.make_trainer(model, train)
    eval_words, eval_products = held_out
    eval_tokens = eval_words.reshape(-1, config.task.eval_batch_size, config.task.seq_len)  # [E, Be, T]
    curriculum = config.task.get("curriculum")
    chunks = batch_chunks(task, train.steps, chunk_steps, train.batch_size, seeds, curriculum)
    label = f"{model_cfg.mixer} layers {model_cfg.num_layers}"
    losses, predictions = seed_batching.train_seeds(
        model, trainer, with_progress(chunks, label, train.steps, chunk_steps), eval_tokens)
    lengths = scored_lengths(curriculum, len(predictions), task.seq_len)
    curve = []
    for call, prediction in enumerate(predictions):
        prediction = seed_batching.predictions_by_seed(prediction)  # [S, N, T]
        accuracy = tracking_accuracy(prediction, eval_products)
        curve.append({"step": (call + 1) * chunk_steps, "scored_length": lengths[call],
                      "token": accuracy["token"].tolist(), "sequence": accuracy["sequence"].tolist(),
                      "tracked_length": accuracy["tracked_length"].tolist()})
    final = tracking_accuracy(seed_batching.predictions_by_seed(predictions[-1]), eval_products)
    return {
        "mixer": model_cfg.mixer, "num_layers": model_cfg.num_layers, "num_params": model.num_params,
        "seeds": seeds, **{name: values.tolist() for name, values in final.items()},
        "final_loss": losses[-max(1, chunk_steps // 10):].mean(axis=0).tolist(), "curve": curve,
        "wall_s": time.perf_counter() - start,
    }


def mean_std(values) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def results_table(runs: list[dict], seq_len: int) -> str:
    """Markdown table: one row per (mixer, layers), mean ± std over seeds."""
    lines = ["| mixer | layers | params | token acc (%) | sequence acc (%) | tracked length (of "
             f"{seq_len}) | final loss |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        tracked = run["tracked_length"]
        lines.append(f"| {run['mixer']} | {run['num_layers']} | {run['num_params']:,} | {mean_std(run['token'])} | "
                     f"{mean_std(run['sequence'])} | {np.mean(tracked):.1f} ({min(tracked)}–{max(tracked)}) | "
                     f"{np.mean(run['final_loss']):.3f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: pathlib.Path) -> None:
    """Left: token and sequence accuracy vs layers per mixer; right: per-position accuracy of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_depth, by_position) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"attention": "tab:blue", "path": "tab:red"}
    mixers = sorted({run["mixer"] for run in runs})
    for mixer in mixers:
        own = sorted((r for r in runs if r["mixer"] == mixer), key=lambda r: r["num_layers"])
        depths = [r["num_layers"] for r in own]
        for metric, style in (("token", "-"), ("sequence", ":")):
            by_depth.errorbar(depths, [np.mean(r[metric]) for r in own], yerr=[np.std(r[metric]) for r in own],
                              linestyle=style, marker="o", capsize=3, color=colors.get(mixer),
                              label=f"{mixer} {metric}")
        for r in own:
            curve = np.mean(r["per_position"], axis=0)  # [T]
            by_position.plot(np.arange(1, len(curve) + 1), curve, color=colors.get(mixer),
                             alpha=0.3 + 0.7 * r["num_layers"] / max(depths), label=f"{mixer} L={r['num_layers']}")
    by_depth.set(xlabel="layers", ylabel="held-out accuracy", ylim=(0, 1.02), title="A5: accuracy vs depth")
    by_depth.set_xticks(sorted({r["num_layers"] for r in runs}))
    by_position.set(xlabel="position t", ylabel="accuracy of p_t", ylim=(0, 1.02), title="per-position accuracy")
    for axis in (by_depth, by_position):
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.split("\n\n")[0], DEFAULT_CONFIG, "results JSON path (the plot goes next to it, .png)")
    parser.add_argument("--seed-batching", default="", choices=("", *seed_batching.SEED_BATCHING),
                        help="run the seeds of one call one after the other (map) or batched (vmap); '': the preset's")
    parser.add_argument("--mixers", nargs="+", default=(), choices=("attention", "path"),
                        help="mixers to run (default: the preset's)")
    parser.add_argument("--layers", nargs="+", type=int, default=(), metavar="L",
                        help="numbers of layers to run (default: the preset's)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    if args.mixers:
        config.mixers = tuple(args.mixers)
    if args.layers:
        config.layers = tuple(args.layers)
    if args.seed_batching:
        config.train.seed_batching = args.seed_batching
    if config.task.get("curriculum"):
        check_curriculum(config.task.curriculum, config.task.seq_len)
    if (config.task.eval_examples % config.task.eval_batch_size) != 0:
        raise ValueError(f"task.eval_batch_size={config.task.eval_batch_size} must divide task.eval_examples="
                         f"{config.task.eval_examples}")
    seeds = list(range(config.seeds))
    start = time.perf_counter()
    task = PermutationTask(config.task.group, config.task.seq_len)
    held_out = task.sample_batch(np.random.default_rng([EVAL_SEED, 2]), config.task.eval_examples)
    runs = []
    for mixer in config.mixers:
        for num_layers in config.layers:
            model_cfg = model_config(config, mixer, num_layers, task.tokenizer.vocab_size)
            run = train_and_evaluate(model_cfg, config, seeds, task, held_out)
            runs.append(run)
            print(f"{mixer:<10} layers {num_layers}  params {run['num_params']:>8,}  token acc "
                  f"{mean_std(run['token'])}  sequence acc {mean_std(run['sequence'])}  wall {run['wall_s']:.1f} s",
                  flush=True)
    results = {"preset": args.preset, "config": config.to_dict(), "runs": runs,
               "total_wall_s": time.perf_counter() - start}
    print(f"\n{config.task.group.upper()} word problems of length {config.task.seq_len}, mean ± std over "
          f"{len(seeds)} seeds; total wall {results['total_wall_s']:.1f} s")
    print(results_table(runs, config.task.seq_len))
    write_results(results, args.output, lambda path: plot(runs, path))
    return results


if __name__ == "__main__":
    main()
