"""Log-linear Mamba-2 / Gated DeltaNet layers: λ params, constant λ == base layer, packed segments, the decode
cache (prefill with right padding, steps, two prefills) and greedy generation against full recomputation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.generate import generate, greedy_without_cache
from jaxlm.layers.gated_deltanet import GatedDeltaNet
from jaxlm.layers.loglinear import LogLinearGatedDeltaNet, LogLinearMamba2
from jaxlm.layers.mamba2 import Mamba2
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.models.mixer_options import GatedDeltaNetOptions, LogLinearOptions, Mamba2Options
from jaxlm.train.optim import weight_decay_mask

# max_seq_len 64 -> 7 levels; chunk 4 so that T = 13..16 crosses chunk levels.
BASE = dict(vocab_size=31, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=24, max_seq_len=64,
            init_std=0.3, mamba2=Mamba2Options(state_dim=4, head_dim=4, expand=2, num_groups=2, conv_width=3,
                                               chunk_size=4),
            gated_deltanet=GatedDeltaNetOptions(num_heads=3, key_dim=4, value_dim=6, conv_width=3, chunk_size=4))
CONFIGS = {
    "mamba2": ModelConfig(mixer="loglinear_mamba2", **BASE).validate(),
    "gdn": ModelConfig(mixer="loglinear_gated_deltanet", **BASE).validate(),
}
CLASSES = {"mamba2": (LogLinearMamba2, Mamba2), "gdn": (LogLinearGatedDeltaNet, GatedDeltaNet)}
KINDS = ["mamba2", "gdn"]


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


call_layer = nnx.jit(lambda layer, x, segment_ids=None, cache=None: layer(x, positions=None, segment_ids=segment_ids,
                                                                          cache=cache))


def random_x(seed, batch=2, length=13):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, 16)), jnp.float32)


LAYERS = {}


def make_layer(kind):
    """One layer per kind for the whole module (the tests do not change it)."""
    if kind not in LAYERS:
        LAYERS[kind] = CLASSES[kind][0](CONFIGS[kind], 0, rngs=nnx.Rngs(0))
    return LAYERS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_level_params_and_levels_from_config(kind):
    layer = make_layer(kind)
    heads = layer.num_heads
    assert layer.levels == 7  # ceil(log2 64) + 1
    np.testing.assert_array_equal(np.asarray(layer.level_weights.level_scale[...]), np.ones((heads, 7)))
    mask = weight_decay_mask(nnx.state(layer, nnx.Param))
    assert not mask["level_weights"]["level_scale"].get_value()
    assert mask["level_weights"]["proj"]["kernel"].get_value()
    config = dataclasses.replace(CONFIGS[kind], loglinear=LogLinearOptions(num_levels=9))
    assert nnx.eval_shape(lambda: CLASSES[kind][0](config, 0, rngs=nnx.Rngs(0))).level_weights.proj.kernel.shape \
        == (16, heads * 9)
    too_few = dataclasses.replace(CONFIGS[kind], loglinear=LogLinearOptions(num_levels=6))
    with pytest.raises(ConfigError, match=r"model.loglinear.num_levels.*at least .* = 7"):
        CLASSES[kind][0](too_few, 0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", KINDS)
def test_constant_lambda_equals_base_layer(kind):
    """With W_λ = 0, λ = softplus(0) on every level: the op is log(2)·(base op), which the output RMSNorm
    removes (Mamba-2: with D = 0; a tiny norm eps, as Mamba-2's outputs are small at init), so the layer
    equals its base layer with the same parameters."""
    loglinear_cls, base_cls = CLASSES[kind]
    config = dataclasses.replace(CONFIGS[kind], norm_eps=1e-12)
    layer = loglinear_cls(config, 0, rngs=nnx.Rngs(3))
    base = base_cls(config, 0, rngs=nnx.Rngs(3))
    layer.level_weights.proj.kernel[...] = jnp.zeros_like(layer.level_weights.proj.kernel[...])
    if kind == "mamba2":
        layer.D[...] = jnp.zeros_like(layer.D[...])
        base.D[...] = jnp.zeros_like(base.D[...])
    x = random_x(0, length=15)
    out, _ = call_layer(layer, x)
    expected, _ = call_layer(base, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-4, atol=1e-5)
    # and λ differing between levels does change it
    kernel_shape = layer.level_weights.proj.kernel[...].shape
    layer.level_weights.proj.kernel[...] = jnp.asarray(np.random.default_rng(0).normal(size=kernel_shape), jnp.float32)
    changed, _ = call_layer(layer, x)
    assert np.max(np.abs(np.asarray(changed - expected))) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_packed_segments_equal_separate_sequences(kind):
    layer = make_layer(kind)
    x = random_x(2)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 8, [1] * 10 + [2] * 3], jnp.int32)
    packed, _ = call_layer(layer, x, segment_ids)
    pieces = [(0, 0, 5), (0, 5, 13), (1, 0, 10), (1, 10, 13)]
    alone = jnp.stack([jnp.pad(x[row, start:end], ((0, 13 - end + start), (0, 0))) for row, start, end in pieces])
    separate, _ = call_layer(layer, alone)
    for index, (row, start, end) in enumerate(pieces):
        np.testing.assert_allclose(np.asarray(packed[row, start:end]), np.asarray(separate[index, :end - start]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_prefill_with_padding_then_steps_equal_full_forward(kind):
    layer = make_layer(kind)
    x = random_x(3, length=16)
    lengths = [5, 11]
    full, _ = call_layer(layer, x)
    cache = layer.init_cache(2, 32, jnp.float32)
    assert cache["levels"].shape[:3] == (2, layer.num_heads, 7) and cache["step"].shape == (2,)
    segment_ids = (np.arange(12)[None] < np.array(lengths)[:, None]).astype(np.int32)
    prefill, cache = call_layer(layer, x[:, :12], jnp.asarray(segment_ids), cache)
    np.testing.assert_array_equal(np.asarray(cache["step"]), lengths)
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(prefill[row, :length]), np.asarray(full[row, :length]), rtol=1e-5,
                                   atol=1e-5)
    for step in range(4):
        x_t = jnp.stack([x[row, length + step] for row, length in enumerate(lengths)])[:, None]
        out_t, cache = call_layer(layer, x_t, None, cache)
        for row, length in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(out_t[row, 0]), np.asarray(full[row, length + step]), rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_two_cached_prefills_equal_one(kind):
    layer = make_layer(kind)
    x = random_x(4, length=16)
    full, _ = call_layer(layer, x)
    cache = layer.init_cache(2, 32, jnp.float32)
    first, cache = call_layer(layer, x[:, :9], None, cache)
    second, _ = call_layer(layer, x[:, 9:], None, cache)
    np.testing.assert_allclose(np.concatenate([first, second], 1), np.asarray(full), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_full_recomputation(kind):
    model = DecoderLM(CONFIGS[kind], rngs=nnx.Rngs(1))
    prompts = [[4, 9, 1, 30, 20], [7, 28, 2], list(range(3, 20))]
    generated = generate(model, prompts, max_new_tokens=4)
    assert generated == greedy_without_cache(model, prompts, 4)
    assert len({token for row in generated for token in row}) > 3
