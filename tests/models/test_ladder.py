"""Residual modes (standard / parallel / ladder / upper_bound): single-device recurrences, scan == unrolled,
tensor-parallel (TP=4 shard_map) == one device, cached decoding == recomputation, gradients, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.convert import to_unrolled
from jaxlm.errors import ConfigError
from jaxlm.generate import generate, greedy_without_cache
from jaxlm.models import DecoderLM, ModelConfig
from jaxlm.models.ladder import decode_compiler_options, layer_residual_modes
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.config import MeshConfig, OptimizerConfig, TrainConfig
from jaxlm.train.optim import make_optimizer
from jaxlm.train.step import create_train_state, make_train_step

CONFIG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=40,
                     init_std=0.15, rope_theta=500.0, max_seq_len=64)


def make_model(seed=0, **changes):
    return DecoderLM(dataclasses.replace(CONFIG, **changes), rngs=nnx.Rngs(seed))


def random_tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=shape), jnp.int32)


def tp_mesh(tensor=4, data=2):
    return make_mesh(MeshConfig(data=data, fsdp=1, tensor=tensor), devices=jax.devices()[: data * tensor])


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def decode(model, tokens, positions, cache):
    return model.decode(tokens, positions=positions, cache=cache)


def reference_logits(model: DecoderLM, tokens, modes):
    """The recurrences written out on one device, module by module (``h_j`` = a block's branch)."""
    x = model.embed(tokens)  # [B, T, d]
    branches = []  # (layer mode, attention branch, mlp branch) per layer
    for block, mode in zip(model.layers.blocks, modes):
        attention = lambda v, block=block: block.mixer_branch(v, positions=None)[0]
        branches.append((mode, attention, block.mlp_branch))
    ladder = []  # the ladder stream r_{-1}, r_0, r_1, ... once the ladder layers start
    for mode, attention, mlp in branches:
        if mode == "standard":
            x = x + attention(x)
            x = x + mlp(x)
        elif mode == "parallel":
            x = x + attention(x) + mlp(x)
        else:  # r_j = r_{j-1} + h_j(r_{j-2}), r_{-1} = r_0 = the stream entering the first ladder layer
            ladder = ladder or [x, x]
            for module in (attention, mlp):
                ladder.append(ladder[-1] + module(ladder[-2]))
            x = ladder[-1]
    return model.lm_head(model.final_norm(x))


def copy_params(source: DecoderLM, target: DecoderLM) -> None:
    nnx.update(target, nnx.state(source, nnx.Param))


@pytest.mark.parametrize("mode,start", [("standard", 0), ("parallel", 0), ("ladder", 0), ("ladder", 1),
                                        ("upper_bound", 0)])
def test_modes_match_written_out_recurrences(mode, start):
    model = make_model(residual_mode=mode, ladder_start_layer=start, tp_shard_map=True)
    tokens = random_tokens(1, (2, 9))
    modes = layer_residual_modes(model.config)
    np.testing.assert_allclose(forward(model, tokens), reference_logits(model, tokens, modes), rtol=1e-5, atol=1e-5)


def test_modes_share_parameters_but_compute_different_functions():
    standard, ladder = make_model(), make_model(residual_mode="ladder")
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(standard, nnx.Param))) == \
        jax.tree.structure(nnx.to_pure_dict(nnx.state(ladder, nnx.Param)))
    tokens = random_tokens(2, (1, 8))
    as_ladder = reference_logits(standard, tokens, ("ladder",) * CONFIG.num_layers)
    as_standard = reference_logits(standard, tokens, ("standard",) * CONFIG.num_layers)
    assert float(jnp.abs(as_ladder - as_standard).max()) > 1e-3


@pytest.mark.parametrize("mode", ("parallel", "ladder"))
def test_scan_equals_unrolled(mode):
    scanned = make_model(seed=3, residual_mode=mode, scan_layers=True)
    unrolled = to_unrolled(scanned)
    tokens = random_tokens(3, (2, 7))
    np.testing.assert_allclose(forward(scanned, tokens), forward(unrolled, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,scan,remat", [("standard", True, "none"), ("parallel", False, "none"),
                                             ("ladder", False, "full"), ("ladder", True, "none")])
def test_tensor_parallel_equals_one_device(mode, scan, remat):
    model = make_model(seed=4, residual_mode=mode, scan_layers=scan, tp_shard_map=True, remat=remat)
    tokens = random_tokens(4, (2, 6))
    expected = forward(model, tokens)
    with jax.set_mesh(tp_mesh()):
        actual = forward(model, tokens)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_upper_bound_skips_communication():
    tokens = random_tokens(5, (2, 6))
    lowered = {}
    for mode in ("upper_bound", "ladder"):
        with jax.set_mesh(tp_mesh()):
            lowered[mode] = nnx.jit(lambda m, t: m(t)).lower(make_model(residual_mode=mode), tokens).as_text()
    assert "all_reduce" in lowered["ladder"]
    assert "all_reduce" not in lowered["upper_bound"] and "all-reduce" not in lowered["upper_bound"]


def one_train_step(model, mesh, tokens):
    """One jaxlm train step on ``mesh`` (under ``jax.set_mesh``): (metrics, updated params)."""
    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=0.05, warmup_steps=0, weight_decay=0.0), params, 2)
    graphdef, state, shardings = create_train_state(model, optimizer, mesh)
    step = make_train_step(graphdef, optimizer, mesh, TrainConfig(steps=1), shardings)
    ones = jnp.ones(tokens[:, 1:].shape, jnp.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones, "loss_mask": ones,
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1] - 1), ones.shape)}
    with jax.set_mesh(mesh):
        state, metrics = step(state, batch)
    return metrics, jax.device_get(state.params)


def test_tensor_parallel_train_step_equals_one_device():
    model = make_model(seed=6, residual_mode="ladder", scan_layers=True)
    tokens = random_tokens(6, (4, 9))
    one_device = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    expected_metrics, expected_params = one_train_step(model, one_device, tokens)
    metrics, params = one_train_step(model, tp_mesh(), tokens)
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], expected_metrics["grad_norm"], rtol=1e-4)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode,scan,tensor", [("ladder", False, 4), ("ladder", True, 2)])
def test_cached_decode_equals_recomputation(mode, scan, tensor):
    model = make_model(seed=7, residual_mode=mode, scan_layers=scan, tp_shard_map=True)
    tokens = random_tokens(7, (2, 9))
    full = forward(model, tokens)  # [B, T, V]
    with jax.set_mesh(tp_mesh(tensor=tensor)):
        cache = model.init_cache(2, 16)
        positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
        logits, cache = decode(model, tokens[:, :6], positions, cache)
        steps = [logits]
        for t in range(6, 9):
            logits, cache = decode(model, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
            steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


def test_generate_under_tensor_parallel_mesh_matches_no_cache_reference():
    model = make_model(seed=8, residual_mode="ladder")
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    with jax.set_mesh(tp_mesh()):
        generated = generate(model, prompts, max_new_tokens=4)
    assert generated == greedy_without_cache(model, prompts, 4)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="residual_mode"):
        make_model(residual_mode="rungs")
    with pytest.raises(ConfigError, match="ladder_start_layer"):
        make_model(residual_mode="ladder", ladder_start_layer=3)
    with pytest.raises(ConfigError, match="ladder_start_layer"):
        make_model(residual_mode="ladder", ladder_start_layer=1, scan_layers=True)
    model = make_model(residual_mode="ladder", num_kv_heads=2)
    with jax.set_mesh(tp_mesh()), pytest.raises(ConfigError, match="num_kv_heads"):
        forward(model, random_tokens(0, (2, 4)))
    model = make_model(residual_mode="ladder", mlp_dim=42)
    with jax.set_mesh(tp_mesh()), pytest.raises(ConfigError, match="mlp_dim"):
        forward(model, random_tokens(0, (2, 4)))


def test_decode_compiler_options_only_on_gpu():
    assert decode_compiler_options("gpu") == {"xla_gpu_all_reduce_combine_threshold_bytes": 0}
    assert decode_compiler_options("cpu") == {}
