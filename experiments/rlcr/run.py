"""RLCR at toy scale: does a calibration reward give calibrated confidences without costing accuracy?

    python experiments/rlcr/run.py --preset full --output_dir runs/rlcr     # one GPU, <= 20 minutes
    python experiments/rlcr/run.py --preset cpu --output_dir runs/rlcr_cpu  # reduced, a few CPU minutes
    python experiments/rlcr/run.py --preset smoke --output_dir runs/rlcr_smoke  # seconds (the tests run it)

Pipeline (REFERENCE.md §5): a small decoder learns the completion format on sums with hidden digits
(``jaxlm.tasks.arithmetic``; SFT with uninformative confidences), then three methods start from it:

- RLVR: GRPO with reward 1[correct]; its confidence is whatever it keeps stating.
- RLCR: GRPO with reward 1[correct] − (q − 1[correct])².
- RLVR + classifier: RLVR's answers, with q from a separately trained correctness classifier (a decoder
  of the same size reading the prompt and the answer and predicting the next token ``1`` or ``0``).

Each is evaluated on in-domain and out-of-domain (both operands hidden) problems with N samples per
prompt: accuracy, ECE, Brier, AUROC and mean |q − q*| over all samples, reliability diagrams, and the
accuracy of majority / confidence-weighted / max-confidence voting as N grows. Writes ``results.json``,
``results.md`` (the table), ``reliability.png`` and ``voting.png`` to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from jaxlm import metrics, rewards, voting
from jaxlm.experiment import preset_config
from jaxlm.generate import generate
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.parallel.mesh import make_mesh
from jaxlm.sampling import SamplingConfig
from jaxlm.tasks import arithmetic
from jaxlm.train.config import MeshConfig, OptimizerConfig
from jaxlm.train.grpo import GRPOConfig, train_grpo
from jaxlm.train.sft import fit, sft_batch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "rlcr_arithmetic.py"
METHODS = ("rlvr", "rlcr", "rlvr_classifier")
SPLITS = {"in_domain": "train", "out_of_domain": "ood"}
TOKENIZER = arithmetic.ArithmeticTokenizer()


def problem_stream(seed: int, split: str = "train"):
    """An endless stream of problems of ``split``."""
    rng = np.random.default_rng(seed)
    while True:
        yield arithmetic.sample_problem(rng, split)


def warm_up(model, config, mesh) -> list[dict]:
    """SFT on the completion format (answers of consistent pairs, uniform random confidences)."""
    rng = np.random.default_rng([config.seed, 1])
    problems = problem_stream(config.seed * 7 + 1)
    seq_len = config.model.max_seq_len

    def batches():
        while True:
            examples = [arithmetic.format_warmup_example(next(problems), TOKENIZER, rng)
                        for _ in range(config.sft.batch_size)]
            yield sft_batch(examples, seq_len=seq_len, pad_id=TOKENIZER.pad_id)

    optimizer = OptimizerConfig(learning_rate=config.sft.learning_rate, warmup_steps=min(50, config.sft.steps // 4),
                                weight_decay=0.0)
    return fit(model, batches(), steps=config.sft.steps, optimizer=optimizer, mesh=mesh, log_every=50,
               description="sft").history


def reward_functions(method: str) -> tuple[dict, dict]:
    """GRPO reward functions (all logged) and their weights.

    RLVR: ``format + 1[correct]``; RLCR: ``format + (1[c] − (q − 1[c])²)``, twice the RLCR repository's
    ``0.5·format + 0.5·correct + 0.5·(1 − (q − c)²)``. The format term makes a format failure the worst
    outcome; without it a wrong answer with q = 0 ties with a broken completion (both 0), and a policy that
    is mostly wrong drifts into breaking the format.
    """
    functions = {"accuracy": rewards.batched(rewards.rlvr_reward), "format": rewards.batched(rewards.format_reward),
                 "confidence": rewards.batched(rewards.stated_confidence)}
    if method == "rlcr":
        functions["rlcr"] = rewards.batched(rewards.rlcr_reward)
        return functions, {"rlcr": 1.0, "format": 1.0}
    return functions, {"accuracy": 1.0, "format": 1.0}


def train_policy(model, method: str, config, mesh) -> list[dict]:
    """GRPO on in-domain problems with the method's reward (``model`` is updated in place)."""
    examples = ({"prompt": arithmetic.prompt_tokens(problem, TOKENIZER), "gold": problem.gold}
                for problem in problem_stream(config.seed * 7 + 2))
    functions, weights = reward_functions(method)
    grpo = GRPOConfig(prompts_per_step=config.grpo.prompts_per_step, group_size=config.grpo.group_size,
                      max_new_tokens=config.grpo.max_new_tokens, temperature=config.grpo.temperature)
    optimizer = OptimizerConfig(learning_rate=config.grpo.learning_rate, warmup_steps=0, min_lr_ratio=1.0,
                                weight_decay=0.0)
    result = train_grpo(model, examples, functions, reward_weights=weights, steps=config.grpo.steps,
                        decode=TOKENIZER.decode, stop_tokens=[TOKENIZER.eos_id], pad_id=TOKENIZER.pad_id,
                        vocab_limit=TOKENIZER.vocab_size, config=grpo, optimizer=optimizer, mesh=mesh, seed=config.seed,
                        description=method,
                        log_every=max(1, config.grpo.steps // 20))
    return result.history


def sample_completions(model, problems, num_samples: int, config, seed: int) -> list[list[str]]:
    """``num_samples`` completions per problem at the rollout temperature: ``texts[p][i]``."""
    prompts = [arithmetic.prompt_tokens(problem, TOKENIZER) for problem in problems for _ in range(num_samples)]
    completions = generate(model, prompts, max_new_tokens=config.grpo.max_new_tokens,
                           sampling=SamplingConfig(temperature=config.grpo.temperature),
                           stop_tokens=[TOKENIZER.eos_id], seed=seed, pad_id=TOKENIZER.pad_id,
                           vocab_limit=TOKENIZER.vocab_size)
    texts = [TOKENIZER.decode(completion) for completion in completions]
    return [texts[p * num_samples:(p + 1) * num_samples] for p in range(len(problems))]


def read_completion(text: str) -> tuple[str | None, float]:
    """``(answer, q)``: the last answer tag, and the stated confidence (0 when the format is broken)."""
    parsed = rewards.parse_completion(text)
    return rewards.extract_answer(text), (parsed.confidence if parsed is not None else 0.0)


def classifier_tokens(problem, answer: str) -> list[int]:
    """``<bos> prompt <answer>a</answer><confidence>``: the classifier predicts ``1`` (right) or ``0`` next."""
    return arithmetic.prompt_tokens(problem, TOKENIZER) + TOKENIZER.encode(f"<answer>{answer}</answer><confidence>")


def train_classifier(policy, config, mesh):
    """A decoder trained to predict whether ``policy``'s sampled answers to fresh problems are right."""
    stream = problem_stream(config.seed * 7 + 3)
    problems = [next(stream) for _ in range(config.classifier.num_prompts)]
    samples = sample_completions(policy, problems, config.classifier.samples_per_prompt, config, seed=config.seed + 11)
    examples = []
    for problem, texts in zip(problems, samples):
        for text in texts:
            answer, _ = read_completion(text)
            if answer is not None and answer.isdigit():
                label = "1" if rewards.is_correct(answer, problem.gold) else "0"
                tokens = classifier_tokens(problem, answer) + TOKENIZER.encode(label)
                examples.append((tokens, [False] * (len(tokens) - 1) + [True]))
    model = DecoderLM(ModelConfig(**config.model), rngs=nnx.Rngs(config.seed + 5))
    rng = np.random.default_rng(config.seed + 6)

    def batches():
        while True:
            rows = rng.choice(len(examples), size=config.classifier.batch_size)
            yield sft_batch([examples[i] for i in rows], seq_len=config.model.max_seq_len, pad_id=TOKENIZER.pad_id)

    optimizer = OptimizerConfig(learning_rate=config.classifier.learning_rate,
                                warmup_steps=min(50, config.classifier.steps // 4), weight_decay=0.0)
    fit(model, batches(), steps=config.classifier.steps, optimizer=optimizer, mesh=mesh, log_every=50,
        description="classifier")
    return model


def classifier_confidence(classifier, problems, answers: list[list[str | None]]) -> list[list[float]]:
    """``P(1) / (P(1) + P(0))`` at the classifier's next token, per (problem, answer); 0 with no answer."""
    rows = [(p, i) for p, row in enumerate(answers) for i, answer in enumerate(row)
            if answer is not None and answer.isdigit()]
    confidences = [[0.0] * len(row) for row in answers]
    if not rows:
        return confidences
    sequences = [classifier_tokens(problems[p], answers[p][i]) for p, i in rows]
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)  # [R, width]
    for r, sequence in enumerate(sequences):
        tokens[r, :len(sequence)] = sequence
    lengths = np.array([len(s) for s in sequences])  # [R]
    logits = np.asarray(nnx.jit(lambda model, x: model(x))(classifier, tokens))  # [R, width, V]
    last = logits[np.arange(len(sequences)), lengths - 1]  # [R, V]
    yes, no = last[:, TOKENIZER.encode("1")[0]], last[:, TOKENIZER.encode("0")[0]]  # [R]
    probability = 1.0 / (1.0 + np.exp(no - yes))  # [R]
    for (p, i), q in zip(rows, probability):
        confidences[p][i] = float(q)
    return confidences


def evaluate(answers, confidences, problems, config) -> dict:
    """The table row of one method on one split (all samples pooled) and its voting curves."""
    flat_answers = [a for row in answers for a in row]
    flat_q = np.array([q for row in confidences for q in row])  # [P * N]
    correct = np.array([rewards.is_correct(a, pr.gold) for pr, row in zip(problems, answers) for a in row])
    optimal = np.array([pr.optimal_confidence(a) for pr, row in zip(problems, answers) for a in row])
    row = metrics.calibration_summary(flat_q, correct)
    row["mean_abs_q_minus_q_star"] = float(np.mean(np.abs(flat_q - optimal)))
    row["answered"] = float(np.mean([a is not None for a in flat_answers]))
    golds = [problem.gold for problem in problems]
    sizes = [n for n in (1, 2, 4, 8, 16, 32) if n <= config.eval.num_samples]
    curves = {rule: [voting.voting_accuracy(answers, confidences, golds, n, rule=rule, num_draws=config.eval.vote_draws,
                                            seed=config.seed) for n in sizes] for rule in voting.VOTING_RULES}
    return {"metrics": row, "voting": {"num_samples": sizes, **curves},
            "confidence": flat_q.tolist(), "correct": correct.astype(int).tolist()}


def write_plots(results: dict, output_dir: pathlib.Path) -> None:
    """``reliability.png`` (split x method reliability diagrams) and ``voting.png`` (accuracy vs N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(SPLITS), len(METHODS), figsize=(4 * len(METHODS), 4 * len(SPLITS)), squeeze=False)
    for r, split in enumerate(SPLITS):
        for c, method in enumerate(METHODS):
            entry = results[split][method]
            metrics.reliability_diagram(entry["confidence"], entry["correct"], title=f"{method} {split}", ax=axes[r, c])
    figure.tight_layout()
    figure.savefig(output_dir / "reliability.png", dpi=100)
    figure, axes = plt.subplots(len(SPLITS), len(METHODS), figsize=(4 * len(METHODS), 3.5 * len(SPLITS)), squeeze=False)
    for r, split in enumerate(SPLITS):
        for c, method in enumerate(METHODS):
            curves = results[split][method]["voting"]
            for rule in voting.VOTING_RULES:
                axes[r, c].plot(curves["num_samples"], curves[rule], "o-", label=rule)
            axes[r, c].set(xscale="log", xlabel="N samples", ylabel="accuracy", title=f"{method} {split}")
            axes[r, c].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output_dir / "voting.png", dpi=100)
    plt.close("all")


def results_table(results: dict) -> str:
    """Markdown table: one row per (split, method)."""
    columns = ("accuracy", "ece", "brier", "auroc", "mean_abs_q_minus_q_star", "mean_confidence", "answered")
    lines = ["| split | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for split in SPLITS:
        for method in METHODS:
            row = results[split][method]["metrics"]
            cells = ["n/a" if math.isnan(row[c]) else f"{row[c]:.3f}" for c in columns]
            lines.append(f"| {split} | {method} | " + " | ".join(cells) + " |")
    sizes = results["in_domain"]["rlvr"]["voting"]["num_samples"]
    lines += ["", "| split | method | rule | " + " | ".join(f"N={n}" for n in sizes) + " |",
              "|---|---|---|" + "---|" * len(sizes)]
    for split in SPLITS:
        for method in METHODS:
            curves = results[split][method]["voting"]
            for rule in voting.VOTING_RULES:
                lines.append(f"| {split} | {method} | {rule} | " + " | ".join(f"{v:.3f}" for v in curves[rule]) + " |")
    return "\n".join(lines) + "\n"


def run(config, output_dir: pathlib.Path, progress: bool = True) -> dict:
    """The whole pipeline; returns (and writes) the results."""
    output_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    start = time.time()
    base = DecoderLM(ModelConfig(**config.model), rngs=nnx.Rngs(config.seed))
    log = {"sft": warm_up(base, config, mesh)}
    policies = {}
    for method in ("rlvr", "rlcr"):
        policies[method] = nnx.clone(base)
        log[method] = train_policy(policies[method], method, config, mesh)
    classifier = train_classifier(policies["rlvr"], config, mesh)
    results: dict = {"config": config.to_dict(), "train_log": log}
    for split, task_split in SPLITS.items():
        stream = problem_stream(config.seed * 7 + 4 + len(split), task_split)
        problems = [next(stream) for _ in range(config.eval.num_prompts)]
        read = {method: [[read_completion(t) for t in row] for row in
                         sample_completions(policies[method], problems, config.eval.num_samples, config,
                                            seed=config.seed + 100)] for method in policies}
        answers = {method: [[a for a, _ in row] for row in read[method]] for method in policies}
        confidences = {method: [[q for _, q in row] for row in read[method]] for method in policies}
        answers["rlvr_classifier"] = answers["rlvr"]
        confidences["rlvr_classifier"] = classifier_confidence(classifier, problems, answers["rlvr"])
        results[split] = {method: evaluate(answers[method], confidences[method], problems, config)
                          for method in METHODS}
        results[split]["best_possible_accuracy"] = float(np.mean([p.best_accuracy() for p in problems]))
    results["seconds"] = time.time() - start
    (output_dir / "results.json").write_text(json.dumps(results))
    (output_dir / "results.md").write_text(results_table(results))
    write_plots(results, output_dir)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file defining get_config(preset)")
    parser.add_argument("--preset", default="full", choices=("full", "cpu", "smoke"))
    parser.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    parser.add_argument("--output_dir", default="runs/rlcr")
    args = parser.parse_args(argv)
    config = preset_config(args.config, "smoke" if args.smoke else args.preset)
    results = run(config, pathlib.Path(args.output_dir))
    print(results_table(results))
    print(f"in-domain best possible accuracy {results['in_domain']['best_possible_accuracy']:.3f}, "
          f"out-of-domain {results['out_of_domain']['best_possible_accuracy']:.3f}; {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
