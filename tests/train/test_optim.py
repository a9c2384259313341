"""Optimizer: schedule vs its closed form, weight-decay mask, one AdamW step vs a float64 oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.train.config import OptimizerConfig, TrainConfig
from jaxlm.train.optim import current_learning_rate, learning_rate_schedule, make_optimizer, weight_decay_mask


def closed_form_lr(step, peak, warmup, decay_end, min_ratio):
    if step < warmup:
        return peak * step / warmup
    if step >= decay_end:
        return peak * min_ratio
    progress = (step - warmup) / (decay_end - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("warmup, decay_steps, total, min_ratio", [
    (7, 0, 37, 0.1),  # decay to the end of training
    (5, 23, 41, 0.25),  # decay ends before training does
    (0, 0, 19, 0.0),  # no warmup, decay to zero
])
def test_schedule_matches_closed_form(warmup, decay_steps, total, min_ratio):
    config = OptimizerConfig(learning_rate=2.5e-3, warmup_steps=warmup, decay_steps=decay_steps,
                             min_lr_ratio=min_ratio)
    schedule = learning_rate_schedule(config, total)
    decay_end = decay_steps or total
    got = np.array([float(schedule(step)) for step in range(total + 3)])
    want = np.array([closed_form_lr(s, 2.5e-3, warmup, decay_end, min_ratio) for s in range(total + 3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("config, total, field", [
    (OptimizerConfig(warmup_steps=50), 50, "optimizer.warmup_steps"),  # warmup fills all of training
    (OptimizerConfig(warmup_steps=10, decay_steps=10), 100, "optimizer.decay_steps"),
    (OptimizerConfig(learning_rate=0.0), 100, "optimizer.learning_rate"),
    (OptimizerConfig(min_lr_ratio=1.5), 100, "optimizer.min_lr_ratio"),
    (OptimizerConfig(b2=1.0), 100, "optimizer.b2"),
    (OptimizerConfig(eps=0.0), 100, "optimizer.eps"),
    (OptimizerConfig(weight_decay=-0.1), 100, "optimizer.weight_decay"),
    (OptimizerConfig(grad_clip_norm=-1.0), 100, "optimizer.grad_clip_norm"),
    (OptimizerConfig(), 0, "train.steps"),
])
def test_bad_optimizer_settings_name_the_field(config, total, field):
    with pytest.raises(ConfigError) as info:
        learning_rate_schedule(config, total)
    assert info.value.field == field


@pytest.mark.parametrize("config, field", [
    (TrainConfig(steps=0), "train.steps"),
    (TrainConfig(grad_accum_steps=0), "train.grad_accum_steps"),
    (TrainConfig(z_loss_weight=-1e-4), "train.z_loss_weight"),
    (TrainConfig(eval_every=-1), "train.eval_every"),
    (TrainConfig(output_dir=""), "train.output_dir"),
])
def test_bad_train_settings_name_the_field(config, field):
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.field == field


class Mixed(nnx.Module):
    """Matrices (decayed), a vector (not), a 3-D tensor (decayed) and a matrix marked no_weight_decay."""

    def __init__(self, rngs):
        normal = lambda *shape: jax.random.normal(rngs.params(), shape)  # noqa: E731
        self.kernel = nnx.Param(normal(5, 3), out_sharding=("embed", "mlp"))
        self.bias = nnx.Param(normal(3), out_sharding=("mlp",))
        self.stacked = nnx.Param(normal(2, 5, 3), out_sharding=("layers", "embed", "mlp"))
        self.gates = nnx.Param(normal(4, 3), out_sharding=("heads", None), no_weight_decay=True)


PARAM_NAMES = ("kernel", "bias", "stacked", "gates")


def mask_values(mask):
    return {name: bool(mask[name].get_value()) for name in PARAM_NAMES}


def test_weight_decay_mask():
    params = nnx.state(Mixed(nnx.Rngs(0)), nnx.Param)
    assert mask_values(weight_decay_mask(params)) == {"kernel": True, "bias": False, "stacked": True, "gates": False}
    plain = {"matrix": np.ones((2, 3)), "vector": np.ones(3)}
    assert weight_decay_mask(plain) == {"matrix": True, "vector": False}


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_one_adamw_step_matches_float64_oracle(clip):
    """p' = p - lr (g_hat / (|g_hat| + eps) + wd * mask * p) for Adam's first step (m_hat = g, v_hat = g^2)."""
    lr, wd, eps = 0.05, 0.3, 1e-3
    config = OptimizerConfig(learning_rate=lr, warmup_steps=0, weight_decay=wd, eps=eps, grad_clip_norm=clip,
                             min_lr_ratio=0.5)
    params = nnx.state(Mixed(nnx.Rngs(1)), nnx.Param)
    optimizer = make_optimizer(config, params, total_steps=10)
    opt_state = optimizer.init(params)
    for leaf in jax.tree.leaves(opt_state):
        assert leaf.dtype in (jnp.float32, jnp.int32)

    grads = jax.tree.map(lambda p: 0.7 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    new_params = jax.tree.map(jnp.add, params, updates)

    raw_grads = {k: np.asarray(grads[k].get_value(), np.float64) for k in PARAM_NAMES}
    norm = np.sqrt(sum(np.sum(g ** 2) for g in raw_grads.values()))
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    decays = mask_values(weight_decay_mask(params))
    for name, g in raw_grads.items():
        p = np.asarray(params[name].get_value(), np.float64)
        g = g * scale
        want = p - lr * (g / (np.abs(g) + eps) + wd * decays[name] * p)
        np.testing.assert_allclose(np.asarray(new_params[name].get_value()), want, rtol=1e-5, atol=1e-6)
    assert float(current_learning_rate(opt_state)) == pytest.approx(lr)


def test_learning_rate_in_state_follows_the_schedule():
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=3, grad_clip_norm=0.0)
    params = {"w": jnp.arange(6.0).reshape(2, 3) + 0.5}
    optimizer = make_optimizer(config, params, total_steps=9)
    schedule = learning_rate_schedule(config, 9)
    opt_state = optimizer.init(params)
    grads = {"w": jnp.linspace(-1.0, 2.0, 6).reshape(2, 3)}
    for step in range(6):
        _, opt_state = optimizer.update(grads, opt_state, params)
        assert float(current_learning_rate(opt_state)) == pytest.approx(float(schedule(step)), rel=1e-6)
        assert float(schedule(step)) == pytest.approx(closed_form_lr(step, 1e-2, 3, 9, 0.1), rel=1e-5)
