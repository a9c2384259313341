"""Mamba-2 layer: parameters and init, dtypes, causality, packed segments, cached prefill + decode steps, and
greedy generation of Mamba-2 and hybrid decoders against full recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.generate import generate, greedy_without_cache
from jaxlm.layers.mamba2 import Mamba2
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.models.mixer_options import Mamba2Options
from jaxlm.train.optim import weight_decay_mask

D_MODEL = 16


def _config(**overrides):
    # 4 heads of P=8 in 2 groups of N=8 (G < H); chunk 8 so that T=13 leaves a partial chunk.
    base = dict(vocab_size=37, d_model=D_MODEL, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=24,
                max_seq_len=64, init_std=0.3,
                mamba2=Mamba2Options(state_dim=8, head_dim=8, expand=2, num_groups=2, conv_width=4, chunk_size=8))
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def layer():
    return Mamba2(_config(), 0, rngs=nnx.Rngs(0))


def _inputs(seed, batch_size=2, length=13):
    return jax.random.normal(jax.random.key(seed), (batch_size, length, D_MODEL))  # [B, T, d]


@nnx.jit
def _forward(layer, x, segment_ids=None):
    """The layer without a cache: ``[B, T, d]`` -> ``[B, T, d]`` (compiled once per shape)."""
    return layer(x, positions=None, segment_ids=segment_ids)[0]


def test_parameters_and_initialisation(layer):
    params = nnx.state(layer, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert layer.in_proj.kernel.shape == (D_MODEL, 2 * 32 + 2 * 2 * 8 + 4)
    assert layer.conv_weight.shape == (4, 32 + 2 * 2 * 8)
    assert layer.out_proj.kernel.shape == (32, D_MODEL)
    dt = jax.nn.softplus(layer.dt_bias[...])
    assert bool(jnp.all((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001))) and float(dt.max() / dt.min()) > 1.5
    minus_a = jnp.exp(layer.A_log[...])
    assert bool(jnp.all((minus_a >= 1.0) & (minus_a <= 16.0)))
    np.testing.assert_array_equal(layer.D[...], np.ones(4))
    mask = weight_decay_mask(params)
    for name in ("A_log", "dt_bias", "D"):
        assert layer.__dict__[name].get_metadata()["no_weight_decay"] is True
        assert mask[name].get_value() is False
    assert mask["in_proj"]["kernel"].get_value() is True


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_output_shape_and_dtype(compute_dtype):
    layer = Mamba2(_config(compute_dtype=compute_dtype), 0, rngs=nnx.Rngs(1))
    x = _inputs(0).astype(compute_dtype)
    y = _forward(layer, x)
    assert y.shape == x.shape and y.dtype == jnp.dtype(compute_dtype)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32)))) and float(jnp.abs(y.astype(jnp.float32)).max()) > 1e-3


def test_causal(layer):
    x = _inputs(2)
    changed = x.at[:, 6].add(1.0)
    y, y_changed = _forward(layer, x), _forward(layer, changed)
    np.testing.assert_array_equal(y[:, :6], y_changed[:, :6])
    assert float(jnp.abs(y[:, 6:] - y_changed[:, 6:]).min(axis=-1).max()) > 0  # later outputs do change
    assert float(jnp.abs(y[:, 6:] - y_changed[:, 6:]).max()) > 1e-4


def test_packed_segments_equal_separate_sequences(layer):
    x = _inputs(3, batch_size=1, length=13)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 8], jnp.int32)
    packed = _forward(layer, x, segment_ids=segment_ids)
    first, second = _forward(layer, x[:, :5]), _forward(layer, x[:, 5:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), atol=1e-5, rtol=1e-5)


def test_right_padded_prefill_then_steps_equal_full_forward(layer):
    """Row 0 has 9 real prompt tokens, row 1 has 5 (then 4 padding tokens, holding garbage); each row then
    continues with 2 single-token steps and one 3-token chunk from its own next position."""
    x = _inputs(4, length=14)
    full = _forward(layer, x)  # [B, 14, d]
    lengths = [9, 5]
    garbage = jax.random.normal(jax.random.key(5), (2, 9, D_MODEL)) * 3.0
    real = jnp.arange(9)[None, :] < jnp.asarray(lengths)[:, None]  # [B, 9]
    prompt = jnp.where(real[..., None], x[:, :9], garbage)
    call = nnx.jit(lambda layer, x, cache, segment_ids: layer(x, positions=jnp.zeros(x.shape[:2], jnp.int32),
                                                              segment_ids=segment_ids, cache=cache))
    out, cache = call(layer, prompt, layer.init_cache(2, 32), real.astype(jnp.int32))
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(out[row, :length], full[row, :length], atol=1e-5, rtol=1e-5)
    rows = jnp.arange(2)[:, None]
    position = jnp.asarray(lengths)[:, None]  # [B, 1] each row's next token
    for width in (1, 1, 3):
        take = position + jnp.arange(width)[None, :]  # [B, width]
        out, cache = call(layer, x[rows, take], cache, None)
        np.testing.assert_allclose(out, full[rows, take], atol=1e-5, rtol=1e-5)
        position = position + width
    assert cache["ssm"].dtype == jnp.float32 and cache["ssm"].shape == (2, 4, 8, 8)


def test_bad_head_configuration_names_the_field():
    with pytest.raises(ConfigError, match="model.mamba2.head_dim"):
        Mamba2(_config(mamba2=Mamba2Options(head_dim=12)), 0, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model.mamba2.num_groups"):
        Mamba2(_config(mamba2=Mamba2Options(head_dim=8, num_groups=3)), 0, rngs=nnx.Rngs(0))



@pytest.mark.parametrize("overrides", [dict(mixer="mamba2"), dict(layer_pattern=("mamba2", "attention"))],
                         ids=["mamba2", "hybrid"])
def test_greedy_generation_equals_full_recomputation(overrides):
    model = DecoderLM(_config(**overrides), rngs=nnx.Rngs(2))
    prompts = [[4, 9, 1, 33, 20], [7, 28, 2], list(range(3, 20))]  # lengths 5, 3, 17
    generated = generate(model, prompts, max_new_tokens=6)
    assert generated == greedy_without_cache(model, prompts, 6)
    assert len({token for row in generated for token in row}) > 3  # a non-trivial continuation
