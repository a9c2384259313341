"""Flip-flop language modelling: do RoPE attention, PaTH, FoX and PaTH-FoX read the last written bit
reliably, in and out of distribution?

    python experiments/flipflop/run.py --preset gpu --output runs/flipflop_gpu     # one H100, <= 5 minutes
    python experiments/flipflop/run.py --preset cpu --output runs/flipflop_cpu     # reduced, 2-core CPU
    python experiments/flipflop/run.py --preset smoke --output runs/flipflop_smoke # seconds (the tests run it)

Task (Liu et al. 2023; REFERENCE.md §8; ``jaxlm.tasks.flipflop``): instruction/bit pairs ``w x`` (write),
``i x`` (ignore), ``r x`` (read: x is the last written bit). Every variant (``configs/experiments/flipflop.py``)
is trained from scratch on FFL(0.8) with the next-token loss (on all tokens, or only on the read answers),
then scored with teacher forcing on held-out sequences of the same length from FFL(0.8) (in distribution),
FFL(0.98) (sparse: long gaps between a write and its reads) and FFL(0.1) (dense). A read is wrong when the
argmax of the logits at the position before its bit is not that bit:

    read error rate     = wrong reads / reads                 (pooled over the evaluation sequences)
    sequence error rate = sequences with a wrong read / sequences

Writes ``results.json`` (per variant, seed and density: the counts and rates; training logs and wall
times), ``results.md`` (the table) and ``error_rates.png`` to ``--output``.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.experiment import config_from_args, experiment_parser, model_config_with
from jaxlm.models.decoder import DecoderLM
from jaxlm.parallel.mesh import make_mesh
from jaxlm.tasks import EVAL_STREAM, FLIPFLOP_PRESETS, TRAIN_STREAM, FlipFlopTask, TaskSource, flipflop_preset
from jaxlm.tasks.symbols import PAD_ID
from jaxlm.train.config import MeshConfig, OptimizerConfig
from jaxlm.train.sft import fit, sft_batch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "flipflop.py"
DENSITIES = ("train", "sparse", "dense")  # FFL(0.8), FFL(0.98), FFL(0.1)
LOSS_ON = ("all", "answers")


def single_device_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def flipflop_task(seq_len: int, density: str) -> FlipFlopTask:
    """FFL(p) sequences of ``seq_len + 1`` tokens for a named density (``jaxlm.tasks.flipflop`` presets)."""
    fields = flipflop_preset(density)
    return FlipFlopTask(seq_len, fields["flipflop_p_write"], fields["flipflop_p_read"], fields["flipflop_p_ignore"])


def training_example(ids: np.ndarray, answer_mask: np.ndarray, loss_on: str) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, learn)`` for ``sft_batch``: learn every real token (``"all"``) or only the read answers."""
    learn = answer_mask if loss_on == "answers" else ids != PAD_ID
    return ids, learn


def training_batches(task: FlipFlopTask, seed: int, batch_size: int, loss_on: str):
    """Endless training batches; example ``i`` is ``TaskSource(task, seed, TRAIN_STREAM)[i]``."""
    source = TaskSource(task, seed, TRAIN_STREAM)
    index = 0
    while True:
        examples = [training_example(*source[index + row], loss_on) for row in range(batch_size)]
        index += batch_size
        yield sft_batch(examples, seq_len=task.seq_len, pad_id=task.tokenizer.pad_id)


def evaluation_set(task: FlipFlopTask, seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` held-out sequences: inputs ``[N, T]`` and the expected bit id after every read (-1
    elsewhere) ``[N, T]``, recomputed from the tokens by ``task.answers``."""
    source = TaskSource(task, seed, EVAL_STREAM)
    sequences = np.stack([source[index][0] for index in range(count)])  # [N, T + 1]
    expected = np.stack([task.answers(sequence) for sequence in sequences])  # [N, T + 1]
    return sequences[:, :-1], expected[:, 1:]


def read_errors(predictions: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """Error counts and rates over the reads: ``predictions, expected [N, T]`` token ids, ``expected`` -1
    where no read answer is due. Rates are 0 when there is nothing to score."""
    is_read = expected >= 0  # [N, T]
    wrong = is_read & (predictions != expected)  # [N, T]
    reads, wrong_reads = int(is_read.sum()), int(wrong.sum())
    scored_sequences = int(is_read.any(axis=1).sum())
    failed_sequences = int(wrong.any(axis=1).sum())
    return {"reads": reads, "wrong_reads": wrong_reads, "read_error_rate": wrong_reads / max(reads, 1),
            "sequences": scored_sequences, "failed_sequences": failed_sequences,
            "sequence_error_rate": failed_sequences / max(scored_sequences, 1)}


def greedy_predictions(model: DecoderLM, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """``argmax`` next-token ids ``[N, T]`` under teacher forcing, in batches of ``batch_size`` (the last one
    padded with copies of the first rows, so every call has one shape)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state, batch):
        return jnp.argmax(nnx.merge(graphdef, state)(batch), axis=-1)  # [b, T]

    outputs = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        filler = tokens[:batch_size - len(batch)]
        outputs.append(np.asarray(predict(state, jnp.asarray(np.concatenate([batch, filler]))))[:len(batch)])
    return np.concatenate(outputs)


def run_variant(name: str, fields: dict, seed: int, config, evaluation: dict) -> dict:
    """Train one variant from scratch with ``seed``, then score it on every evaluation density."""
    train = config.train
    model = DecoderLM(model_config_with(config.model.to_dict(), fields), rngs=nnx.Rngs(seed))
    warmup_steps = min(train.warmup_steps, train.steps // 2)  # a short --steps override keeps a valid schedule
    optimizer = OptimizerConfig(learning_rate=train.learning_rate, warmup_steps=warmup_steps,
                                weight_decay=train.weight_decay)
    batches = training_batches(flipflop_task(train.seq_len, train.density), seed, train.batch_size, train.loss_on)
    started = time.perf_counter()
    history = fit(model, batches, steps=train.steps, optimizer=optimizer, mesh=single_device_mesh(),
                  log_every=max(1, train.steps // 10), progress=False, description=name).history
    trained = time.perf_counter()
    scores = {density: read_errors(greedy_predictions(model, tokens, config.eval.batch_size), expected)
              for density, (tokens, expected) in evaluation.items()}
    finished = time.perf_counter()
    return {"variant": name, "seed": seed, "num_params": model.num_params(), "scores": scores,
            "train_seconds": trained - started, "eval_seconds": finished - trained, "history": history}


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Mean read and sequence error rates over seeds, per variant and density."""
    summary = {}
    for name in variants:
        mine = [run for run in runs if run["variant"] == name]
        summary[name] = {density: {key: float(np.mean([run["scores"][density][key] for run in mine]))
                                   for key in ("read_error_rate", "sequence_error_rate")}
                         for density in mine[0]["scores"]}
    return summary


def markdown_table(summary: dict, runs: list[dict]) -> str:
    densities = list(next(iter(summary.values())))
    header = "| variant | " + " | ".join(f"{d} read err % | {d} seq err %" for d in densities) + " | train s |"
    lines = [header, "|---" * (2 * len(densities) + 2) + "|"]
    for name, scores in summary.items():
        seconds = np.mean([run["train_seconds"] for run in runs if run["variant"] == name])
        cells = [f"{100 * scores[d]['read_error_rate']:.2f} | {100 * scores[d]['sequence_error_rate']:.1f}"
                 for d in densities]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, densities = list(summary), list(next(iter(summary.values())))
    width = 0.8 / len(variants)
    figure, axes = plt.subplots(figsize=(7, 3.6))
    for index, name in enumerate(variants):
        rates = [100 * summary[name][d]["read_error_rate"] for d in densities]
        bars = axes.bar(np.arange(len(densities)) + (index - (len(variants) - 1) / 2) * width, rates, width,
                        label=name)
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(np.arange(len(densities)), [f"FFL({FLIPFLOP_PRESETS[d]})\n{d}" for d in densities])
    axes.set_ylabel("read error rate (%)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.split("\n\n")[0], DEFAULT_CONFIG, "output folder (default runs/flipflop_<preset>)")
    parser.add_argument("--variants", default="", help="comma-separated subset of the preset's variants")
    parser.add_argument("--loss-on", default="", choices=("",) + LOSS_ON, help="override train.loss_on")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    if args.loss_on:
        config.train.loss_on = args.loss_on
    if config.train.loss_on not in LOSS_ON:
        raise ValueError(f"train.loss_on must be one of {LOSS_ON}, got {config.train.loss_on!r}")
    variants = args.variants.split(",") if args.variants else list(config.variants)
    fields = config.variant_fields.to_dict()
    unknown = [name for name in variants if name not in fields]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; the config defines {sorted(fields)}")
    output = pathlib.Path(args.output or f"runs/flipflop_{args.preset}")
    output.mkdir(parents=True, exist_ok=True)

    evaluation = {density: evaluation_set(flipflop_task(config.train.seq_len, density), config.seed,
                                          config.eval.sequences[density]) for density in DENSITIES}
    runs = []
    started = time.perf_counter()
    for seed in range(config.seed, config.seed + config.seeds):
        for name in variants:
            run = run_variant(name, fields[name], seed, config, evaluation)
            runs.append(run)
            rates = "  ".join(f"{d} {100 * s['read_error_rate']:6.2f}%" for d, s in run["scores"].items())
            print(f"{name:<9} seed {seed}: train {run['train_seconds']:6.1f}s eval {run['eval_seconds']:5.1f}s"
                  f"  read error {rates}", flush=True)
    summary = summarize(runs, variants)
    table = markdown_table(summary, runs)
    results = {"preset": args.preset, "config": config.to_dict(), "summary": summary, "runs": runs,
               "total_seconds": time.perf_counter() - started, "device": str(jax.devices()[0].device_kind)}
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text(table)
    plot(summary, output / "error_rates.png",
         f"flip-flop, trained on FFL(0.8), T={config.train.seq_len} ({args.preset} preset)")
    print(table + f"total {results['total_seconds']:.0f}s; wrote {output}/results.json, results.md, error_rates.png")
    return results


def enable_compilation_cache() -> None:
    """Share compiled programs between runs of one invocation (seeds of a variant compile once)."""
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="flipflop_jax_cache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


if __name__ == "__main__":
    enable_compilation_cache()
    main()
