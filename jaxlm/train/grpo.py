"""GRPO (Shao et al. 2024, "DeepSeekMath", Sec. 4.1) as used by RLCR (Damani et al. 2025, Sec. 3).

Every step samples G completions ``o_1 … o_G`` per prompt with the jitted sampler of ``jaxlm.generate``,
scores them with weighted reward functions ``r_i = Σ_k w_k reward_k(prompts, completions, **fields)_i``,
and takes the group-relative advantage

    A_i = r_i − mean_j r_j                     (or (r_i − mean_j r_j) / (std_j r_j + 1e-4) with scale_rewards)

Every completion token t of o_i then gets the PPO-clip objective with ratio ``ρ_t = π_θ(o_t) / π_old(o_t)``
and, with ``kl_beta > 0``, the k3 estimate of KL(π_θ ‖ π_ref) to a frozen reference:

    loss = − Σ_{i,t} m_{i,t} [min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε) A_i) − β (e^Δ − Δ − 1)] / Σ_{i,t} m_{i,t}
    Δ = Δ_t = log π_ref(o_t) − log π_θ(o_t)

``m`` marks completion tokens; a truncated completion (no stop token within ``max_new_tokens``) gets
``m = 0`` when ``mask_truncated``. Normalising by all active tokens of the batch follows RLCR. With one
update per generation batch (the default, on-policy) ``π_old = stop_gradient(π_θ)``, so ``ρ = 1`` and the
gradient is the policy gradient; with more, ``π_old`` is the policy that sampled the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxlm.errors import is_finite_number, is_int, require
from jaxlm.generate import LENGTH_BUCKET, generate
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import batch_sharding, shard_batch
from jaxlm.sampling import SamplingConfig
from jaxlm.train.config import MeshConfig, OptimizerConfig
from jaxlm.train.optim import current_learning_rate, make_optimizer
from jaxlm.train.sft import sft_batch
from jaxlm.train.step import TrainState, create_train_state

RewardFunction = Callable[..., list[float]]  # reward(prompts, completions, **example_fields) -> [N] floats


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Fields:
        prompts_per_step: prompts P drawn per generation batch.
        group_size: completions G sampled per prompt (the batch has P·G rows).
        max_new_tokens: longest completion; one without a stop token by then is truncated.
        temperature: sampling temperature of the rollouts (> 0).
        clip_epsilon: PPO clip range ε.
        kl_beta: weight β of the KL penalty to the frozen reference policy (0: no reference is kept).
        scale_rewards: divide advantages by the group's reward std (Dr. GRPO / RLCR leave this off).
        updates_per_batch: optimizer steps per generation batch (1: on-policy).
        mask_truncated: give truncated completions no loss (they still count in the group mean).
    """

    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.7
    clip_epsilon: float = 0.2
    kl_beta: float = 0.0
    scale_rewards: bool = False
    updates_per_batch: int = 1
    mask_truncated: bool = True

    def validate(self) -> "GRPOConfig":
        """Raise ConfigError naming the first bad field; return self when all are valid."""
        for name in ("prompts_per_step", "max_new_tokens", "updates_per_batch"):
            value = getattr(self, name)
            require(is_int(value) and value > 0, f"grpo.{name}", value, "a positive integer")
        require(is_int(self.group_size) and self.group_size >= 2, "grpo.group_size", self.group_size,
                "an integer >= 2 (advantages compare completions within a group)")
        require(is_finite_number(self.temperature) and self.temperature > 0, "grpo.temperature", self.temperature,
                "a positive number (rollouts are sampled)")
        require(is_finite_number(self.clip_epsilon) and 0 < self.clip_epsilon < 1, "grpo.clip_epsilon",
                self.clip_epsilon, "a number in (0, 1)")
        require(is_finite_number(self.kl_beta) and self.kl_beta >= 0, "grpo.kl_beta", self.kl_beta,
                "a number >= 0 (0 turns the KL penalty off)")
        return self


def group_advantages(rewards: np.ndarray, scale_rewards: bool = False, eps: float = 1e-4) -> np.ndarray:
    """``A = r − mean_group(r)`` for ``rewards [P, G]`` (P prompts, G completions each); returns ``[P, G]``.

    With ``scale_rewards``: ``A = (r − mean) / (std + eps)``, std the population std of the group.
    """
    rewards = np.asarray(rewards, np.float64)  # [P, G]
    require(rewards.ndim == 2, "rewards", rewards.shape, "a [prompts, group_size] array")
    advantages = rewards - rewards.mean(axis=1, keepdims=True)  # [P, G]
    if scale_rewards:
        advantages = advantages / (rewards.std(axis=1, keepdims=True) + eps)
    return advantages


def target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits)[target]`` per position: ``[N, T, V]``, ``[N, T]`` -> ``[N, T]`` float32."""
    return -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def grpo_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              clip_epsilon: float = 0.2, ref_log_probs: jax.Array | None = None,
              kl_beta: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped-surrogate loss of the module docstring and its metrics.

    ``log_probs, old_log_probs, ref_log_probs, mask: [N, T]``, ``advantages: [N]``. Metrics:
    ``clip_fraction`` (active tokens whose ratio left [1 − ε, 1 + ε]), ``kl`` (mean k3 estimate) and
    ``active_tokens``.
    """
    mask = mask.astype(jnp.float32)  # [N, T]
    active = jnp.maximum(mask.sum(), 1.0)
    ratio = jnp.exp(log_probs - old_log_probs)  # [N, T]
    advantage = advantages.astype(jnp.float32)[:, None]  # [N, 1]
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)  # [N, T]
    surrogate = jnp.minimum(ratio * advantage, clipped_ratio * advantage)  # [N, T]
    kl = jnp.zeros_like(log_probs)  # [N, T]
    if ref_log_probs is not None:
        log_ratio_to_ref = ref_log_probs - log_probs  # [N, T]
        kl = jnp.exp(log_ratio_to_ref) - log_ratio_to_ref - 1.0
    loss = -jnp.sum(mask * (surrogate - kl_beta * kl)) / active
    was_clipped = (jnp.abs(ratio - 1.0) > clip_epsilon).astype(jnp.float32)  # [N, T]
    metrics = {"clip_fraction": jnp.sum(mask * was_clipped) / active, "kl": jnp.sum(mask * kl) / active,
               "active_tokens": mask.sum()}
    return loss, metrics


def _model_log_probs(graphdef: nnx.GraphDef, params: nnx.State, batch: Mapping[str, jax.Array]) -> jax.Array:
    """One forward pass over prompt + completion: ``log π(targets)`` ``[N, T]``."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])  # [N, T, V]
    return target_log_probs(logits, batch["targets"])


def make_grpo_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: Mesh,
                   state_shardings: TrainState, config: GRPOConfig) -> Callable:
    """A jitted ``step(state, batch) -> (state, metrics)``.

    ``batch`` holds ``[N, T]`` arrays ``tokens, targets, positions, segment_ids, loss_mask`` (the completion
    mask), ``advantages [N]``, and ``old_log_probs`` (when ``updates_per_batch > 1``) and ``ref_log_probs``
    (when ``kl_beta > 0``) ``[N, T]``.
    """
    on_policy = config.updates_per_batch == 1

    def objective(params, batch):
        log_probs = _model_log_probs(graphdef, params, batch)  # [N, T]
        old = jax.lax.stop_gradient(log_probs) if on_policy else batch["old_log_probs"]
        return grpo_loss(log_probs, old, batch["advantages"], batch["loss_mask"],
                         clip_epsilon=config.clip_epsilon, ref_log_probs=batch.get("ref_log_probs"),
                         kl_beta=config.kl_beta)

    def step(state: TrainState, batch):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
                   "learning_rate": jnp.asarray(current_learning_rate(opt_state), jnp.float32)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated))


@dataclasses.dataclass
class Rollout:
    """One generation batch: P·G rows, row ``p·G + g`` is completion g of prompt p."""

    prompts: list[list[int]]  # [N] token lists
    completions: list[list[int]]  # [N] token lists (stop token included)
    truncated: np.ndarray  # [N] bool: no stop token within max_new_tokens
    rewards: dict[str, np.ndarray]  # name -> [N], every reward function's raw value
    total_reward: np.ndarray  # [N] Σ_k w_k reward_k
    advantages: np.ndarray  # [N]


def collect_rollout(model, examples: Sequence[Mapping], reward_functions: Mapping[str, RewardFunction],
                    reward_weights: Mapping[str, float], config: GRPOConfig, *, decode: Callable[[list[int]], str],
                    stop_tokens: Sequence[int], pad_id: int = 0, seed: int = 0,
                    vocab_limit: int | None = None) -> Rollout:
    """Sample ``config.group_size`` completions of every ``example["prompt"]`` and score them.

    Each reward function is called as ``fn(prompt_texts, completion_texts, **fields)`` with every other
    field of the examples repeated per completion (e.g. ``gold=[...]``); weight-0 functions are only logged.
    ``vocab_limit`` keeps ids the tokenizer lacks (a padded vocabulary) from being sampled.
    """
    group = config.group_size
    prompts = [list(example["prompt"]) for example in examples for _ in range(group)]
    completions = generate(model, prompts, max_new_tokens=config.max_new_tokens,
                           sampling=SamplingConfig(temperature=config.temperature), stop_tokens=stop_tokens,
                           seed=seed, pad_id=pad_id, vocab_limit=vocab_limit)
    stops = set(int(t) for t in stop_tokens)
    truncated = np.array([not completion or completion[-1] not in stops for completion in completions])  # [N]
    fields = {key: [example[key] for example in examples for _ in range(group)]
              for key in examples[0] if key != "prompt"}
    prompt_texts, completion_texts = [decode(p) for p in prompts], [decode(c) for c in completions]
    rewards, total = {}, np.zeros(len(prompts))  # [N]
    for name, function in reward_functions.items():
        values = np.asarray(function(prompt_texts, completion_texts, **fields), np.float64)  # [N]
        require(values.shape == (len(prompts),), f"reward_functions[{name!r}]", f"{values.shape} values",
                f"one float per completion ({len(prompts)})")
        rewards[name] = values
        weight = reward_weights.get(name, 0.0)
        if weight:
            require(bool(np.all(np.isfinite(values))), f"reward_functions[{name!r}]", "non-finite rewards",
                    "finite rewards (only weight-0, logged functions may return NaN)")
            total += weight * values
    advantages = group_advantages(total.reshape(-1, group), config.scale_rewards).reshape(-1)  # [N]
    return Rollout(prompts=prompts, completions=completions, truncated=truncated, rewards=rewards,
                   total_reward=total, advantages=advantages)


def rollout_batch(rollout: Rollout, config: GRPOConfig, max_seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The train batch of a rollout: ``sft_batch`` rows over prompt + completion, learning the completion
    tokens (none of a truncated completion when ``mask_truncated``), plus ``advantages [N]``.

    The row length is the longest sequence rounded up to ``LENGTH_BUCKET`` (capped at ``max_seq_len``), so
    the step compiles for few shapes.
    """
    examples = []
    for prompt, completion, truncated in zip(rollout.prompts, rollout.completions, rollout.truncated):
        learn = not (truncated and config.mask_truncated)
        examples.append((prompt + completion, [False] * len(prompt) + [learn] * len(completion)))
    longest = max(len(tokens) for tokens, _ in examples) - 1
    seq_len = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, max_seq_len)
    batch = sft_batch(examples, seq_len=seq_len, pad_id=pad_id)
    batch["advantages"] = rollout.advantages.astype(np.float32)
    return batch


@dataclasses.dataclass
class GRPOResult:
    """``history[i]``: step, mean reward, the mean of every reward function, and the update's metrics."""

    history: list[dict[str, float]]


def train_grpo(model: nnx.Module, examples: Iterable[Mapping], reward_functions: Mapping[str, RewardFunction], *,
               steps: int, decode: Callable[[list[int]], str], stop_tokens: Sequence[int],
               reward_weights: Mapping[str, float] | None = None, config: GRPOConfig = GRPOConfig(),
               optimizer: OptimizerConfig = OptimizerConfig(warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0),
               mesh: Mesh | None = None, pad_id: int = 0, vocab_limit: int | None = None, seed: int = 0,
               log_every: int = 1,
               progress: bool = True, description: str = "grpo") -> GRPOResult:
    """Train ``model``'s params in place for ``steps`` generation batches of GRPO.

    ``examples`` yields dicts with ``"prompt"`` (token ids) and the fields the reward functions need;
    each step takes ``config.prompts_per_step`` of them. ``reward_weights`` (default: 1 for every
    function) weights the rewards; functions with weight 0 (e.g. accuracy, format rate, mean confidence)
    are only logged, and the progress bar shows every function's mean (NaNs ignored). ``decode`` turns
    token ids into the text the reward functions read; ``vocab_limit`` (default: the model's vocabulary)
    bounds the sampled ids to the tokenizer's. ``mesh`` defaults to all devices on the data axis
    (P·G must be a multiple of its batch shards).
    """
    config.validate()
    require(is_int(steps) and steps > 0, "steps", steps, "a positive integer")
    require(len(stop_tokens) > 0 or not config.mask_truncated, "stop_tokens", tuple(stop_tokens),
            "at least one stop token (without one every completion is truncated and masked)")
    weights = {name: 1.0 for name in reward_functions} if reward_weights is None else dict(reward_weights)
    unknown = sorted(set(weights) - set(reward_functions))
    require(not unknown, "reward_weights", unknown, f"names of reward_functions {tuple(reward_functions)}")
    mesh = make_mesh(MeshConfig()) if mesh is None else mesh
    total_updates = steps * config.updates_per_batch
    transform = make_optimizer(optimizer, nnx.state(model, nnx.Param), total_updates)
    graphdef, state, shardings = create_train_state(model, transform, mesh)
    update = make_grpo_step(graphdef, transform, mesh, shardings, config)
    log_probs = jax.jit(lambda params, batch: _model_log_probs(graphdef, params, batch))
    reference = state.params if config.kl_beta > 0 else None  # frozen copy of the starting policy
    nnx.update(model, state.params)  # generate with the params in their training sharding from the start
    example_iterator: Iterator = iter(examples)
    history: list[dict[str, float]] = []
    show = progress and jax.process_index() == 0
    with tqdm(total=steps, desc=description, disable=not show, leave=False) as bar:
        for step in range(1, steps + 1):
            batch_examples = [next(example_iterator) for _ in range(config.prompts_per_step)]
            rollout = collect_rollout(model, batch_examples, reward_functions, weights, config, decode=decode,
                                      stop_tokens=stop_tokens, pad_id=pad_id, seed=seed * 1_000_003 + step,
                                      vocab_limit=vocab_limit)
            batch = shard_batch(rollout_batch(rollout, config, model.config.max_seq_len, pad_id), mesh)
            if config.updates_per_batch > 1:
                batch["old_log_probs"] = log_probs(state.params, batch)
            if reference is not None:
                batch["ref_log_probs"] = log_probs(reference, batch)
            for _ in range(config.updates_per_batch):
                state, metrics = update(state, batch)
            nnx.update(model, state.params)
            if step % log_every == 0 or step == steps:
                record = _step_record(step, rollout, metrics)
                history.append(record)
                bar.set_postfix({key: f"{record[key]:.3f}" for key in ["reward", *reward_functions]})
            bar.update(1)
    return GRPOResult(history=history)


def _step_record(step: int, rollout: Rollout, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """The logged values of one step: rollout means (NaN-ignoring) and the last update's metrics."""
    record = {"step": step, "reward": float(rollout.total_reward.mean()),
              "truncated_fraction": float(rollout.truncated.mean())}
    for name, values in rollout.rewards.items():
        finite = values[np.isfinite(values)]
        record[name] = float(finite.mean()) if finite.size else math.nan
    record.update({name: float(value) for name, value in metrics.items()})
    return record
