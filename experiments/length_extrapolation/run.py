"""Length extrapolation at toy scale: train every mixer at length N, then measure the loss at N, 2N, 4N, 8N.

    python experiments/length_extrapolation/run.py --preset gpu --output runs/length_gpu      # one H100, <= 5 min
    python experiments/length_extrapolation/run.py --preset cpu --output runs/length_cpu      # reduced, 2-core CPU
    python experiments/length_extrapolation/run.py --preset smoke --output runs/length_smoke  # seconds (tests)

Variants (``configs/experiments/length_extrapolation.py``): RoPE attention, PaTH, FoX, PaTH-FoX, Mamba-2,
log-linear Mamba-2, Gated DeltaNet and log-linear Gated DeltaNet, same width and depth, trained from scratch
on the same batches. RoPE meets rotation angles past the trained length at 2N and beyond; the others carry
order in data-dependent transforms, gates or recurrent states.

Data (generated here, the same on every machine): a second-order Markov language (each two-token context
allows a few next tokens with fixed random probabilities), in which at every position, with a fixed
probability, a span of ``span`` tokens copied from a uniformly random earlier place begins. The sequence
is generated left to right, so its first L tokens are distributed as a sequence of length L; one
evaluation pass over sequences of length 8N therefore gives every evaluation length (a causal model's
prediction at position t depends only on tokens ≤ t), with one compiled evaluation shape per model:

    loss(L)          = mean next-token cross-entropy over positions [0, L)
    loss_new_half(L) = mean over positions [L/2, L)        (the positions first seen at length L)
    copy_loss(L)     = mean over the copied tokens in [L/2, L) (in-context recall at distance up to L)

Writes ``results.json``, ``results.md`` (the tables) and ``loss_by_position.png`` to ``--output``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm.experiment import config_from_args, experiment_parser, model_config_with
from jaxlm.models.decoder import DecoderLM
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.config import MeshConfig, OptimizerConfig
from jaxlm.train.sft import fit, sft_batch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "length_extrapolation.py"
TRAIN_STREAM, EVAL_STREAM = 0, 1
PLOT_BINS = 64


@dataclasses.dataclass(frozen=True)
class MarkovCopyLanguage:
    """A second-order Markov chain over ``vocab`` tokens with copied spans (module docstring).

    ``next_tokens [V, V, branching]`` are the tokens allowed after each context ``(x_{t-2}, x_{t-1})`` and
    ``probabilities [V, V, branching]`` their probabilities (Dirichlet(0.5) draws), both fixed by ``table_seed``.
    """

    vocab: int
    branching: int
    copy_probability: float
    span: int
    table_seed: int

    @property
    def table(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.table_seed)
        next_tokens = rng.integers(0, self.vocab, size=(self.vocab, self.vocab, self.branching))
        probabilities = rng.dirichlet(np.full(self.branching, 0.5), size=(self.vocab, self.vocab))
        return next_tokens, probabilities

    def sample(self, rng: np.random.Generator, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` sequences of ``length`` tokens, generated left to right: ``(tokens [N, L] int32,
        sources [N, L] int)`` with ``sources[n, t]`` the earlier position token t was copied from (-1 for a
        Markov token). A copy starts at t ≥ span with probability ``copy_probability`` when none is running,
        from a start s uniform in ``[0, t − span]``, and copies ``x_s … x_{s+span−1}`` to
        ``x_t … x_{t+span−1}``."""
        next_tokens, probabilities = self.table
        cumulative = np.cumsum(probabilities, axis=-1)  # [V, V, branching]
        tokens = np.zeros((count, length), np.int32)
        sources = np.full((count, length), -1, np.int64)
        tokens[:, :2] = rng.integers(0, self.vocab, size=(count, min(2, length)))
        rows = np.arange(count)
        copy_from = np.zeros(count, np.int64)  # position the next copied token comes from
        remaining = np.zeros(count, np.int64)  # tokens left in the running copy
        for t in range(2, length):
            context = (tokens[:, t - 2], tokens[:, t - 1])
            branch = (rng.random(count)[:, None] > cumulative[context]).sum(-1)  # [N] inverse-CDF draw
            markov = next_tokens[context + (np.minimum(branch, self.branching - 1),)]  # [N]
            start = (remaining == 0) & (rng.random(count) < self.copy_probability) & (t >= self.span)
            chosen = rng.integers(0, max(t - self.span, 0) + 1, size=count)  # [N] copy start in [0, t − span]
            copy_from = np.where(start, chosen, copy_from)
            remaining = np.where(start, self.span, remaining)
            copying = remaining > 0
            tokens[:, t] = np.where(copying, tokens[rows, copy_from], markov)
            sources[:, t] = np.where(copying, copy_from, -1)
            copy_from += copying
            remaining -= copying
        return tokens, sources


def training_batches(language: MarkovCopyLanguage, seed: int, batch_size: int, seq_len: int):
    """Endless batches of ``seq_len`` inputs; batch ``i`` draws from ``default_rng([seed, TRAIN_STREAM, i])``."""
    index = 0
    while True:
        tokens, _ = language.sample(np.random.default_rng([seed, TRAIN_STREAM, index]), batch_size, seq_len + 1)
        index += 1
        yield sft_batch([(row, np.ones_like(row, bool)) for row in tokens], seq_len=seq_len)


def token_losses(model: DecoderLM, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """Next-token cross-entropy ``[N, L-1]`` float64 of ``tokens [N, L]`` (inputs ``x[:, :-1]``, targets
    ``x[:, 1:]``), in batches of ``batch_size`` (``N`` must be a multiple: one compiled shape)."""
    if len(tokens) % batch_size:
        raise ValueError(f"eval.sequences={len(tokens)} must be a multiple of eval.batch_size={batch_size}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, batch):
        logits = nnx.merge(graphdef, state)(batch[:, :-1])  # [b, L-1, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])  # [b, L-1]

    return np.concatenate([np.asarray(losses(state, jnp.asarray(tokens[start:start + batch_size])), np.float64)
                           for start in range(0, len(tokens), batch_size)])


def length_metrics(losses: np.ndarray, copied: np.ndarray, lengths: list[int]) -> dict[str, dict[str, float]]:
    """Per evaluation length L (module docstring): ``loss`` over target positions ``[0, L)``, ``loss_new_half``
    over ``[L/2, L)`` and ``copy_loss`` over the copied targets in ``[L/2, L)`` (NaN when there are none).
    ``losses [N, T]`` per target position, ``copied [N, T]`` bool."""
    metrics = {}
    for length in lengths:
        half = length // 2
        new_copies = copied[:, half:length]
        metrics[str(length)] = {
            "loss": float(losses[:, :length].mean()),
            "loss_new_half": float(losses[:, half:length].mean()),
            "copy_loss": float(losses[:, half:length][new_copies].mean()) if new_copies.any() else float("nan"),
        }
    return metrics


def loss_by_position(losses: np.ndarray, bins: int = PLOT_BINS) -> list[float]:
    """Mean loss in ``bins`` equal runs of target positions (the plot's curve)."""
    return [float(chunk.mean()) for chunk in np.array_split(losses.mean(axis=0), bins)]


def run_variant(name: str, fields: dict, seed: int, config, language: MarkovCopyLanguage,
                evaluation: tuple[np.ndarray, np.ndarray], lengths: list[int]) -> dict:
    """Train one variant at ``train.seq_len`` from ``seed``, then score it at every evaluation length."""
    train = config.train
    model = DecoderLM(model_config_with(config.model.to_dict(), fields), rngs=nnx.Rngs(seed))
    warmup_steps = min(train.warmup_steps, train.steps // 2)  # a short --steps override keeps a valid schedule
    optimizer = OptimizerConfig(learning_rate=train.learning_rate, warmup_steps=warmup_steps,
                                weight_decay=train.weight_decay)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    started = time.perf_counter()
    history = fit(model, training_batches(language, seed, train.batch_size, train.seq_len), steps=train.steps,
                  optimizer=optimizer, mesh=mesh, log_every=max(1, train.steps // 10), progress=False,
                  description=name).history
    trained = time.perf_counter()
    tokens, sources = evaluation
    losses = token_losses(model, tokens, config.eval.batch_size)  # [N, 8N]
    finished = time.perf_counter()
    return {"variant": name, "seed": seed, "num_params": model.num_params(),
            "lengths": length_metrics(losses, sources[:, 1:] >= 0, lengths),
            "loss_by_position": loss_by_position(losses), "train_seconds": trained - started,
            "eval_seconds": finished - trained, "history": history}


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Seed means of every per-length metric, per variant."""
    summary = {}
    for name in variants:
        mine = [run for run in runs if run["variant"] == name]
        summary[name] = {length: {key: float(np.mean([run["lengths"][length][key] for run in mine]))
                                  for key in values} for length, values in mine[0]["lengths"].items()}
    return summary


def markdown_tables(summary: dict, runs: list[dict], train_length: int) -> str:
    lengths = list(next(iter(summary.values())))
    blocks = []
    for key, title in (("loss", "loss over the first L tokens"), ("loss_new_half", "loss over tokens L/2 … L"),
                       ("copy_loss", "loss on copied tokens in L/2 … L")):
        header = f"| {title} | " + " | ".join(f"L={length} ({int(length) // train_length}N)" for length in lengths)
        lines = [header + " | train s |", "|---" * (len(lengths) + 2) + "|"]
        for name, metrics in summary.items():
            seconds = np.mean([run["train_seconds"] for run in runs if run["variant"] == name])
            lines.append(f"| {name} | " + " | ".join(f"{metrics[length][key]:.3f}" for length in lengths)
                         + f" | {seconds:.0f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def plot(runs: list[dict], variants: list[str], train_length: int, longest: int, path: pathlib.Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.2))
    for name in variants:
        curve = np.mean([run["loss_by_position"] for run in runs if run["variant"] == name], axis=0)
        centres = (np.arange(len(curve)) + 0.5) * longest / len(curve)
        axes.plot(centres, curve, label=name, linestyle="--" if name.startswith("loglinear") else "-")
    axes.axvline(train_length, color="grey", linewidth=1)
    axes.text(train_length, axes.get_ylim()[1], " trained length", va="top", color="grey")
    axes.set_xlabel("position")
    axes.set_ylabel(f"next-token loss (mean over {PLOT_BINS} bins)")
    axes.set_title(title)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.split("\n\n")[0], DEFAULT_CONFIG, "output folder (default runs/length_extrapolation_<preset>)")
    parser.add_argument("--variants", default="", help="comma-separated subset of the config's variants")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    variants = args.variants.split(",") if args.variants else list(config.variants)
    fields = config.variant_fields.to_dict()
    unknown = [name for name in variants if name not in fields]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; the config defines {sorted(fields)}")
    output = pathlib.Path(args.output or f"runs/length_extrapolation_{args.preset}")
    output.mkdir(parents=True, exist_ok=True)

    language = MarkovCopyLanguage(**config.data.to_dict())
    train_length = config.train.seq_len
    lengths = [train_length * factor for factor in config.eval.factors]
    longest = max(lengths)
    if longest > config.model.max_seq_len:
        raise ValueError(f"the longest evaluation length {longest} exceeds model.max_seq_len="
                         f"{config.model.max_seq_len}")
    evaluation = language.sample(np.random.default_rng([config.seed, EVAL_STREAM]), config.eval.sequences,
                                 longest + 1)
    runs = []
    started = time.perf_counter()
    for seed in range(config.seed, config.seed + config.seeds):
        for name in variants:
            run = run_variant(name, fields[name], seed, config, language, evaluation, lengths)
            runs.append(run)
            losses = "  ".join(f"{length}: {values['loss']:.3f}" for length, values in run["lengths"].items())
            print(f"{name:<24} seed {seed}: train {run['train_seconds']:6.1f}s eval {run['eval_seconds']:5.1f}s"
                  f"  loss {losses}", flush=True)
    summary = summarize(runs, variants)
    tables = markdown_tables(summary, runs, train_length)
    results = {"preset": args.preset, "config": config.to_dict(), "train_length": train_length, "lengths": lengths,
               "summary": summary, "runs": runs, "total_seconds": time.perf_counter() - started,
               "device": str(jax.devices()[0].device_kind)}
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text(tables)
    plot(runs, variants, train_length, longest, output / "loss_by_position.png",
         f"trained at N={train_length}, evaluated to {longest} ({args.preset} preset)")
    print(tables + f"total {results['total_seconds']:.0f}s; wrote {output}/results.json, results.md, "
          "loss_by_position.png")
    return results


def enable_compilation_cache() -> None:
    """Share compiled programs between runs of one invocation (seeds of a variant compile once)."""
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="length_extrapolation_jax_cache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


if __name__ == "__main__":
    enable_compilation_cache()
    main()
