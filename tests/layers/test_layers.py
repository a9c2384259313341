"""Embed, RMSNorm, SwiGLU and Attention layers against numpy formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers import Attention, Embed, RMSNorm, SwiGLU, mixer_class
from jaxlm.layers.attention import write_kv_cache
from jaxlm.models.config import ModelConfig

CONFIG = ModelConfig(vocab_size=29, d_model=24, num_layers=2, num_heads=6, num_kv_heads=2, mlp_dim=40,
                     init_std=0.2, rope_theta=100.0).validate()


def np_rope(x, positions, theta):
    half = x.shape[-1] // 2
    angles = positions[:, :, None, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def np_causal_attention(q, k, v, q_pos, kv_pos):
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where((kv_pos[:, None, :] <= q_pos[:, :, None])[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", probs / probs.sum(-1, keepdims=True), v)


def np_attention_layer(layer, x, positions):
    """Float64 re-implementation of the Attention layer from its parameters."""
    def proj(linear, inputs):
        out = inputs @ np.asarray(linear.kernel[...], np.float64)
        return out + np.asarray(linear.bias[...], np.float64) if linear.bias is not None else out

    B, T, _ = x.shape
    q = np_rope(proj(layer.q_proj, x).reshape(B, T, 6, 4), positions, 100.0)
    k = np_rope(proj(layer.k_proj, x).reshape(B, T, 2, 4), positions, 100.0)
    v = proj(layer.v_proj, x).reshape(B, T, 2, 4)
    return proj(layer.o_proj, np_causal_attention(q, k, v, positions, positions).reshape(B, T, 24))


def logical_axes(variable):
    return variable.get_metadata()["out_sharding"]


def test_embed_lookup_and_tied_logits():
    embed = Embed(CONFIG, rngs=nnx.Rngs(0))
    table = np.asarray(embed.embedding[...])
    assert table.shape == (29, 24) and embed.embedding[...].dtype == jnp.float32
    assert logical_axes(embed.embedding) == ("vocab", "embed")
    assert 0.15 < table.std() < 0.25  # init_std = 0.2
    tokens = np.array([[3, 28, 0, 7, 7], [1, 2, 5, 11, 13]])
    np.testing.assert_array_equal(np.asarray(embed(jnp.asarray(tokens))), table[tokens])
    x = np.random.default_rng(0).normal(size=(2, 5, 24)).astype(np.float32)
    logits = embed.attend(jnp.asarray(x))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), x @ table.T, rtol=1e-5, atol=1e-5)


def test_bfloat16_embed_and_norm_compute_in_bfloat16():
    config = dataclasses.replace(CONFIG, compute_dtype="bfloat16")
    embed, norm = Embed(config, rngs=nnx.Rngs(0)), RMSNorm(config, rngs=nnx.Rngs(0))
    x = embed(jnp.array([[1, 2, 3]]))
    assert x.dtype == jnp.bfloat16 and embed.embedding[...].dtype == jnp.float32
    assert norm(x).dtype == jnp.bfloat16
    assert embed.attend(x).dtype == jnp.float32


def test_rms_norm_layer_starts_at_unit_scale():
    norm = RMSNorm(CONFIG, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(norm.scale[...]), np.ones(24))
    assert logical_axes(norm.scale) == ("embed",)
    x = np.random.default_rng(1).normal(size=(2, 3, 24)).astype(np.float32) * 4
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + CONFIG.norm_eps)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_formula():
    mlp = SwiGLU(CONFIG, rngs=nnx.Rngs(2))
    assert logical_axes(mlp.gate_proj.kernel) == ("embed", "mlp")
    assert logical_axes(mlp.down_proj.kernel) == ("mlp", "embed")
    assert mlp.gate_proj.bias is None
    x = np.random.default_rng(2).normal(size=(2, 7, 24))
    gate, up, down = (np.asarray(m.kernel[...], np.float64) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    hidden = x @ gate
    expected = (hidden / (1 + np.exp(-hidden)) * (x @ up)) @ down
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x, jnp.float32))), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_layer_matches_numpy(bias):
    layer = Attention(dataclasses.replace(CONFIG, attention_bias=bias), 0, rngs=nnx.Rngs(3))
    assert mixer_class("attention") is Attention
    assert logical_axes(layer.q_proj.kernel) == ("embed", "heads")
    assert logical_axes(layer.k_proj.kernel) == ("embed", "kv_heads")
    assert logical_axes(layer.o_proj.kernel) == ("heads", "embed")
    assert layer.k_proj.kernel[...].shape == (24, 8)
    assert (layer.q_proj.bias is not None) == bias
    if bias:  # make the biases non-zero so the test sees them
        for linear in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
            linear.bias[...] = jax.random.normal(jax.random.key(4), linear.bias[...].shape)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 11, 24))
    positions = np.stack([np.arange(11), np.arange(11) + 5])
    out, cache = layer(jnp.asarray(x, jnp.float32), positions=jnp.asarray(positions, jnp.int32))
    assert cache is None
    np.testing.assert_allclose(np.asarray(out), np_attention_layer(layer, x, positions), rtol=1e-4, atol=1e-4)
    default_out, _ = layer(jnp.asarray(x, jnp.float32), positions=None)  # None means arange(T)
    np.testing.assert_allclose(np.asarray(default_out)[0], np.asarray(out)[0], rtol=1e-5, atol=1e-5)


def test_write_kv_cache_scatters_rows_at_their_own_positions():
    cache = {"k": jnp.zeros((2, 6, 1, 2)), "v": jnp.zeros((2, 6, 1, 2))}
    k = jnp.arange(1.0, 9.0).reshape(2, 2, 1, 2)
    positions = jnp.array([[1, 2], [4, 6]])  # slot 6 is out of range: dropped
    written = write_kv_cache(cache, k, -k, positions)
    expected = np.zeros((2, 6, 1, 2))
    expected[0, 1], expected[0, 2], expected[1, 4] = k[0, 0], k[0, 1], k[1, 0]
    np.testing.assert_array_equal(np.asarray(written["k"]), expected)
    np.testing.assert_array_equal(np.asarray(written["v"]), -expected)


def test_attention_cache_prefill_then_step_matches_full_forward():
    layer = Attention(CONFIG, 0, rngs=nnx.Rngs(5))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 9, 24)), jnp.float32)
    full, _ = nnx.jit(lambda layer, x: layer(x, positions=None))(layer, x)
    cache = layer.init_cache(2, 12, jnp.float32)
    assert cache["k"].shape == (2, 12, 2, 4) and cache["v"].dtype == jnp.float32
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    call = nnx.jit(lambda layer, x, positions, cache: layer(x, positions=positions, cache=cache))
    prefill, cache = call(layer, x[:, :8], positions, cache)
    step, cache = call(layer, x[:, 8:], jnp.full((2, 1), 8), cache)
    np.testing.assert_allclose(np.asarray(prefill), np.asarray(full[:, :8]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, 8:]), rtol=1e-5, atol=1e-5)
    # Prefill padding marks (segment id 0) change nothing for attention: the slots are overwritten later.
    cache = layer.init_cache(2, 12, jnp.float32)
    padding_marks = (positions < jnp.array([[5], [8]])).astype(jnp.int32)  # [B, 8]
    marked, _ = layer(x[:, :8], positions=positions, segment_ids=padding_marks, cache=cache)
    np.testing.assert_allclose(np.asarray(marked), np.asarray(prefill), rtol=1e-6, atol=1e-6)
