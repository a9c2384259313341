"""GRPO: advantages and the clipped loss on hand-checked batches, truncation masking, and learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.config import MeshConfig, OptimizerConfig
from jaxlm.train.grpo import GRPOConfig, Rollout, group_advantages, grpo_loss, rollout_batch, train_grpo


def test_group_advantages_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    np.testing.assert_allclose(group_advantages(rewards), [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [1, -1, 0, 0]])
    scaled = group_advantages(rewards, scale_rewards=True, eps=1e-12)
    np.testing.assert_allclose(scaled[0], [1, -1, -1, 1])  # std 0.5
    np.testing.assert_allclose(scaled[2], np.array([1, -1, 0, 0]) / np.sqrt(0.5))  # std sqrt(0.5)
    with pytest.raises(ConfigError, match="prompts, group_size"):
        group_advantages(np.ones(4))


def reference_loss(log_probs, old, advantages, mask, epsilon, ref=None, beta=0.0):
    """Float64 loops over every token: the module docstring's formula written out."""
    total, active = 0.0, 0.0
    for i in range(log_probs.shape[0]):
        for t in range(log_probs.shape[1]):
            if mask[i, t]:
                ratio = np.exp(log_probs[i, t] - old[i, t])
                term = min(ratio * advantages[i], np.clip(ratio, 1 - epsilon, 1 + epsilon) * advantages[i])
                if ref is not None:
                    delta = ref[i, t] - log_probs[i, t]
                    term -= beta * (np.exp(delta) - delta - 1)
                total += term
                active += 1
    return -total / active


def test_grpo_loss_on_a_hand_checked_batch():
    # Row 0: A = +1, ratios e^0.5 (clipped to 1.2, objective 1.2) and 1 (objective 1); row 1: A = −2, ratio
    # e^−0.5 = 0.607 (clipped to 0.8: min(−1.213, −1.6) = −1.6); the last token is masked.
    log_probs = jnp.array([[-1.0, -2.0], [-1.5, -0.1]])
    old = jnp.array([[-1.5, -2.0], [-1.0, -0.3]])
    advantages = jnp.array([1.0, -2.0])
    mask = jnp.array([[1, 1], [1, 0]])
    loss, metrics = grpo_loss(log_probs, old, advantages, mask, clip_epsilon=0.2)
    assert float(loss) == pytest.approx(-(1.2 + 1.0 - 1.6) / 3, rel=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 3) and float(metrics["active_tokens"]) == 3


def test_grpo_loss_and_kl_match_a_float64_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    log_probs, old, ref = (np.log(rng.uniform(0.05, 1, (4, 6))) for _ in range(3))
    advantages, mask = rng.normal(size=4), rng.random((4, 6)) < 0.7
    loss, metrics = grpo_loss(jnp.asarray(log_probs), jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask),
                              clip_epsilon=0.2, ref_log_probs=jnp.asarray(ref), kl_beta=0.1)
    assert float(loss) == pytest.approx(reference_loss(log_probs, old, advantages, mask, 0.2, ref, 0.1), rel=1e-5)
    delta = (ref - log_probs)[mask]
    assert float(metrics["kl"]) == pytest.approx(np.mean(np.exp(delta) - delta - 1), rel=1e-5)


def test_on_policy_gradient_is_the_advantage_weighted_score_over_active_tokens():
    """With π_old = stop_gradient(π): d loss / d log π_t = −m_t A_i / Σ m."""
    log_probs = jnp.array([[-0.3, -1.2, -2.0], [-0.7, -0.1, -0.9]])
    advantages, mask = jnp.array([0.5, -1.5]), jnp.array([[1, 1, 0], [1, 1, 1]])
    grad = jax.grad(lambda lp: grpo_loss(lp, jax.lax.stop_gradient(lp), advantages, mask)[0])(log_probs)
    np.testing.assert_allclose(grad, -np.asarray(mask) * np.asarray(advantages)[:, None] / 5, rtol=1e-6)


def test_rollout_batch_masks_prompts_and_truncated_completions():
    rollout = Rollout(prompts=[[1, 5], [1, 5]], completions=[[6, 2], [6, 7, 7]], truncated=np.array([False, True]),
                      rewards={}, total_reward=np.zeros(2), advantages=np.array([0.5, -0.5]))
    batch = rollout_batch(rollout, GRPOConfig(group_size=2), max_seq_len=8)
    np.testing.assert_array_equal(batch["loss_mask"][:, :4], [[0, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["targets"][1, :4], [5, 6, 7, 7])
    np.testing.assert_allclose(batch["advantages"], [0.5, -0.5])
    kept = rollout_batch(rollout, GRPOConfig(group_size=2, mask_truncated=False), max_seq_len=8)
    np.testing.assert_array_equal(kept["loss_mask"][1, :4], [0, 1, 1, 1])


@pytest.mark.parametrize("field, value", [("group_size", 1), ("temperature", 0.0), ("clip_epsilon", 1.5),
                                          ("kl_beta", -1.0), ("updates_per_batch", 0)])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ConfigError, match=field):
        GRPOConfig(**{field: value}).validate()


def test_a_few_grpo_steps_increase_the_reward():
    """Reward = fraction of completion tokens equal to 5: GRPO should raise it well above chance (1/8).

    Two updates per generation batch and a small KL penalty exercise the off-policy ratio and the reference.
    """
    config = ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=32,
                         max_seq_len=16)
    model = DecoderLM(config, rngs=nnx.Rngs(0))

    def share_of_fives(prompts, completions, **fields):
        return [completion.split().count("5") / max(len(completion.split()), 1) for completion in completions]

    examples = iter(lambda: {"prompt": [1, 3], "tag": 0}, None)
    result = train_grpo(model, examples, {"fives": share_of_fives}, steps=12,
                        decode=lambda ids: " ".join(map(str, ids)), stop_tokens=[2],
                        config=GRPOConfig(prompts_per_step=4, group_size=8, max_new_tokens=4, temperature=1.0,
                                          mask_truncated=False, updates_per_batch=2, kl_beta=0.01),
                        optimizer=OptimizerConfig(learning_rate=3e-2, warmup_steps=0, weight_decay=0.0),
                        mesh=make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]), progress=False, log_every=1)
    rewards = [record["reward"] for record in result.history]
    assert len(rewards) == 12 and np.isfinite(result.history[-1]["loss"])
    assert result.history[-1]["kl"] > 0  # the policy moved away from the frozen reference
    assert np.mean(rewards[:2]) < 0.3 and np.mean(rewards[-3:]) > 0.6, rewards
