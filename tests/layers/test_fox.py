"""Forgetting Attention (mixer "fox", PaTH with ``householder=False``): the layer equals a float64 oracle
``softmax(scale·q kᵀ + G_i − G_j)`` under the causal mask, and decoding equals the parallel forward pass.
(Gradients of the blockwise op, any β including 0, are checked in tests/ops/test_path_vjp.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.layers.path_attention import ForgettingAttention, PaTHAttention
from jaxlm.layers.registry import mixer_class
from jaxlm.models.config import ModelConfig
from jaxlm.models.mixer_options import PaTHOptions

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, WIDTH = 4, 2, 8, 32


def tiny_config(**overrides):
    # block_size 8 with T = 19: the blockwise form runs full blocks and a padded tail.
    base = dict(vocab_size=61, d_model=WIDTH, num_layers=2, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS,
                mlp_dim=48, max_seq_len=64, init_std=0.3, mixer="fox",
                path=PaTHOptions(low_rank=8, block_size=8))
    return ModelConfig(**{**base, **overrides}).validate()


def random_activations(seed, batch, length):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, WIDTH)), jnp.float32)


def forgetting_attention_oracle(q, k, v, log_f, scale):
    """float64 ``o_i = Σ_{j≤i} softmax_j(scale·q_i·k_j + G_i − G_j) v_j``, ``G = cumsum(log_f)``; kv head of
    query head h is ``h // (H // G)``. ``q [B, T, H, D]``, ``k, v [B, T, G, D]``, ``log_f [B, T, H]``."""
    q, k, v, log_f = (np.asarray(a, np.float64) for a in (q, k, v, log_f))
    repeats = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, repeats, axis=2), np.repeat(v, repeats, axis=2)  # [B, T, H, D]
    gate = np.cumsum(log_f, axis=1)  # [B, T, H]
    logits = scale * np.einsum("bihd,bjhd->bhij", q, k) + (gate.transpose(0, 2, 1)[..., :, None]
                                                            - gate.transpose(0, 2, 1)[..., None, :])  # [B, H, T, T]
    length = q.shape[1]
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", weights, v)  # [B, T, H, D]


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def layer_oracle(layer: ForgettingAttention, x: jax.Array) -> np.ndarray:
    """The layer's function recomputed in float64 numpy from its parameters."""
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    kernel = {name: np.asarray(getattr(layer, name).kernel[...], np.float64)
              for name in ("q_proj", "k_proj", "v_proj", "o_proj", "forget_proj")}
    q = (x @ kernel["q_proj"]).reshape(batch, length, NUM_HEADS, HEAD_DIM)
    k = (x @ kernel["k_proj"]).reshape(batch, length, NUM_KV_HEADS, HEAD_DIM)
    v = (x @ kernel["v_proj"]).reshape(batch, length, NUM_KV_HEADS, HEAD_DIM)
    log_f = log_sigmoid(x @ kernel["forget_proj"] + np.asarray(layer.forget_proj.bias[...], np.float64))
    out = forgetting_attention_oracle(q, k, v, log_f, HEAD_DIM ** -0.5)
    return out.reshape(batch, length, NUM_HEADS * HEAD_DIM) @ kernel["o_proj"]


def test_fox_is_registered_and_has_no_householder_branch():
    assert mixer_class("fox") is ForgettingAttention
    # The fox mixer forces the gate on and the Householders off whatever config.path says.
    layer = ForgettingAttention(tiny_config(path=PaTHOptions(forget_gate=False, householder=True)), 0,
                                rngs=nnx.Rngs(0))
    assert layer.forget_gate and not layer.householder
    for name in ("beta_proj", "direction_down", "direction_up", "direction_conv"):
        assert not hasattr(layer, name)
    assert layer.forget_proj.kernel.shape == (WIDTH, NUM_HEADS)
    assert "w_conv" not in layer.init_cache(2, 8)


@pytest.mark.parametrize("impl", ["blockwise", "naive"])
def test_fox_layer_equals_float64_oracle(impl):
    layer = ForgettingAttention(tiny_config(path=PaTHOptions(block_size=8, impl=impl)), 0, rngs=nnx.Rngs(3))
    # A non-zero gate bias so G_i − G_j differs clearly between heads and from the zero-initialised default.
    layer.forget_proj.bias[...] = jnp.asarray([-1.5, 0.3, 2.0, -0.2])
    x = random_activations(1, 2, 19)
    out = nnx.jit(lambda layer, x: layer(x, positions=None)[0])(layer, x)
    np.testing.assert_allclose(np.asarray(out), layer_oracle(layer, x), rtol=2e-5, atol=2e-5)


def test_path_without_householders_and_gate_is_plain_causal_attention():
    """householder=False, forget_gate=False: softmax attention with no position encoding (G ≡ 0)."""
    config = tiny_config(mixer="path", path=PaTHOptions(block_size=8, householder=False))
    layer = PaTHAttention(config, 0, rngs=nnx.Rngs(4))
    x = random_activations(2, 1, 13)
    out = nnx.jit(lambda layer, x: layer(x, positions=None)[0])(layer, x)
    xs = np.asarray(x, np.float64)
    q, k, v = (xs @ np.asarray(getattr(layer, name).kernel[...], np.float64) for name in ("q_proj", "k_proj", "v_proj"))
    expected = forgetting_attention_oracle(q.reshape(1, 13, 4, 8), k.reshape(1, 13, 2, 8), v.reshape(1, 13, 2, 8),
                                           np.zeros((1, 13, 4)), 8 ** -0.5)
    expected = expected.reshape(1, 13, 32) @ np.asarray(layer.o_proj.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


def test_fox_prefill_and_decode_equal_parallel_forward():
    layer = ForgettingAttention(tiny_config(), 0, rngs=nnx.Rngs(1))
    layer.forget_proj.bias[...] = jnp.asarray([-1.0, 0.5, 1.5, 0.0])
    prompt_lengths, padded_length, steps = np.array([4, 9]), 11, 3
    x = random_activations(2, 2, 9 + steps)  # every row's real sequence
    junk = random_activations(3, 2, padded_length)
    is_prompt = np.arange(padded_length)[None] < prompt_lengths[:, None]  # [B, P]
    prompt = jnp.where(is_prompt[..., None], x[:, :padded_length], junk)  # junk after each prompt

    @nnx.jit
    def run(layer, prompt, segment_ids, x):
        cache = layer.init_cache(2, 20, jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(padded_length), (2, padded_length))
        prefill, cache = layer(prompt, positions=positions, segment_ids=segment_ids, cache=cache)
        outputs = []
        for step in range(steps):
            token_positions = jnp.asarray(prompt_lengths + step)[:, None]  # [B, 1]
            token = jnp.take_along_axis(x, token_positions[..., None], axis=1)  # [B, 1, d]
            out, cache = layer(token, positions=token_positions, cache=cache)
            outputs.append(out[:, 0])
        full, _ = layer(x, positions=None)
        return prefill, jnp.stack(outputs, 1), full

    prefill, decoded, full = run(layer, prompt, jnp.asarray(is_prompt, jnp.int32), x)
    for row, length in enumerate(prompt_lengths):
        np.testing.assert_allclose(np.asarray(prefill[row, :length]), np.asarray(full[row, :length]),
                                   rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(decoded[row]), np.asarray(full[row, length:length + steps]),
                                   rtol=2e-5, atol=2e-5)


def test_householder_option_must_be_bool():
    with pytest.raises(ConfigError, match="model.path.householder"):
        tiny_config(path=PaTHOptions(householder="no"))
