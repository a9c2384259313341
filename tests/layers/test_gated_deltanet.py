"""GatedDeltaNet layer: a float64 reference from its parameters, causality, packed segments, the decode cache,
and greedy generation of Gated DeltaNet (and hybrid) decoders against full recomputation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.generate import generate, greedy_without_cache
from jaxlm.layers.gated_deltanet import GatedDeltaNet
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.models.mixer_options import GatedDeltaNetOptions
from jaxlm.ops.delta_rule import gated_delta_rule
from jaxlm.train.optim import weight_decay_mask

# H = 3 heads, K = 4, V = 6, conv width 3, chunk 8: T = 13 spans a partial second chunk.
CONFIG = ModelConfig(vocab_size=31, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=24,
                     max_seq_len=64, init_std=0.3, mixer="gated_deltanet",
                     gated_deltanet=GatedDeltaNetOptions(num_heads=3, key_dim=4, value_dim=6, conv_width=3,
                                                         chunk_size=8)).validate()
H, K, V, W = 3, 4, 6, 3


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """Float32 tolerances assume float32 matmuls (GPUs would otherwise use TF32 for them)."""
    with jax.default_matmul_precision("float32"):
        yield


def random_x(seed, batch=2, length=13, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, CONFIG.d_model)), dtype)


@pytest.fixture(scope="module")
def layer():
    return GatedDeltaNet(CONFIG, 0, rngs=nnx.Rngs(0))


call_layer = nnx.jit(lambda layer, x, segment_ids=None, cache=None: layer(x, positions=None, segment_ids=segment_ids,
                                                                          cache=cache))


def params64(layer):
    return {path: np.asarray(leaf, np.float64) for path, leaf in
            ((".".join(map(str, p)), v[...]) for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param)))}


def np_layer(layer, x):
    """Float64 Gated DeltaNet layer from its parameters (the recurrence by the float64 recurrent op, itself
    tested against a numpy oracle)."""
    p, x = params64(layer), np.asarray(x, np.float64)
    B, T, _ = x.shape
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731

    def conv(z, weight):  # causal depthwise conv, zeros before the sequence
        padded = np.concatenate([np.zeros((B, W - 1, z.shape[-1])), z], axis=1)
        return sum(weight[j] * padded[:, j:j + T] for j in range(W))

    q, k, v = (silu(conv(x @ p[f"{n}_proj.kernel"], p[f"{n}_conv"])) for n in "qkv")
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V)
    q = q / np.sqrt((q ** 2).sum(-1, keepdims=True) + 1e-6) / np.sqrt(K)
    k = k / np.sqrt((k ** 2).sum(-1, keepdims=True) + 1e-6)
    log_a = -np.exp(p["A_log"]) * np.log1p(np.exp(x @ p["a_proj.kernel"] + p["dt_bias"]))
    beta = 1 / (1 + np.exp(-(x @ p["b_proj.kernel"])))
    with jax.enable_x64(True):
        o = np.asarray(gated_delta_rule(*(jnp.asarray(z, jnp.float64) for z in (q, k, v, log_a, beta)),
                                        impl="recurrent"))
    normed = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + CONFIG.norm_eps) * p["o_norm"]
    gated = normed * silu((x @ p["g_proj.kernel"]).reshape(B, T, H, V))
    return gated.reshape(B, T, H * V) @ p["out_proj.kernel"]


def test_layer_matches_float64_reference(layer):
    x = random_x(0)
    out, cache = call_layer(layer, x)
    assert cache is None and out.shape == x.shape and out.dtype == jnp.float32
    expected = np_layer(layer, x)
    assert np.abs(expected).mean() > 1e-3
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_parameters_shapes_metadata_and_bfloat16(layer):
    assert layer.q_proj.kernel.shape == (16, H * K) and layer.v_proj.kernel.shape == (16, H * V)
    assert layer.q_conv.shape == (W, H * K) and layer.v_conv.shape == (W, H * V) and layer.o_norm.shape == (V,)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert layer.A_log.get_metadata()["no_weight_decay"] and layer.dt_bias.get_metadata()["no_weight_decay"]
    mask = weight_decay_mask(nnx.state(layer, nnx.Param))
    assert not mask["A_log"].get_value() and not mask["dt_bias"].get_value() and mask["q_proj"]["kernel"].get_value()
    assert layer.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    a = np.exp(np.asarray(layer.A_log[...]))
    dt = np.log1p(np.exp(np.asarray(layer.dt_bias[...])))
    assert np.all((a >= 1) & (a <= 16)) and np.all((dt >= 1e-3 * 0.99) & (dt <= 0.1 * 1.01))
    config16 = dataclasses.replace(CONFIG, compute_dtype="bfloat16")
    layer16 = GatedDeltaNet(config16, 0, rngs=nnx.Rngs(0))
    out16, _ = call_layer(layer16, random_x(0, dtype=jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    out32, _ = call_layer(layer, random_x(0))
    np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), rtol=0.1, atol=0.05)


def test_layer_is_causal(layer):
    x = random_x(1)
    changed = x.at[:, 7].add(1.0)
    out, _ = call_layer(layer, x)
    out_changed, _ = call_layer(layer, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :7]), np.asarray(out_changed[:, :7]))
    assert np.abs(np.asarray(out[:, 7:] - out_changed[:, 7:])).min(axis=-1).max() > 1e-4


def test_packed_segments_equal_separate_sequences(layer):
    x = random_x(2)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 8, [1] * 10 + [2] * 3], jnp.int32)
    packed, _ = call_layer(layer, x, segment_ids)
    # Each segment alone, right-padded to 13 tokens (causal: the padding cannot change it) to compile once.
    pieces = [(0, 0, 5), (0, 5, 13), (1, 0, 10), (1, 10, 13)]
    alone = jnp.stack([jnp.pad(x[row, start:end], ((0, 13 - end + start), (0, 0))) for row, start, end in pieces])
    separate, _ = call_layer(layer, alone)  # [4, 13, d]
    for index, (row, start, end) in enumerate(pieces):
        np.testing.assert_allclose(np.asarray(packed[row, start:end]), np.asarray(separate[index, :end - start]),
                                   rtol=1e-5, atol=1e-6)


def test_cache_prefill_with_padding_then_steps_equal_full_forward(layer):
    x = random_x(3, length=16)
    lengths = [5, 11]  # rows prefilled with different numbers of real tokens (the rest is right padding)
    full, _ = call_layer(layer, x)
    cache = layer.init_cache(2, 32, jnp.float32)
    assert cache["state"].shape == (2, H, K, V) and cache["q_conv"].shape == (2, W - 1, H * K)
    segment_ids = (np.arange(12)[None] < np.array(lengths)[:, None]).astype(np.int32)  # [2, 12]
    prefill, cache = call_layer(layer, x[:, :12], jnp.asarray(segment_ids), cache)
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(prefill[row, :length]), np.asarray(full[row, :length]), rtol=1e-5,
                                   atol=1e-6)
    # Decode 4 more tokens; each row continues from its own next position.
    for step in range(4):
        x_t = jnp.stack([x[row, length + step] for row, length in enumerate(lengths)])[:, None]  # [2, 1, d]
        out_t, cache = call_layer(layer, x_t, None, cache)
        for row, length in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(out_t[row, 0]), np.asarray(full[row, length + step]), rtol=1e-5,
                                       atol=1e-6)


def test_two_cached_prefills_equal_one(layer):
    x = random_x(4, length=16)
    full, _ = call_layer(layer, x)
    cache = layer.init_cache(2, 32, jnp.float32)
    first, cache = call_layer(layer, x[:, :9], None, cache)
    second, _ = call_layer(layer, x[:, 9:], None, cache)
    np.testing.assert_allclose(np.concatenate([first, second], 1), np.asarray(full), rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("layer_pattern", [(), ("gated_deltanet", "attention")], ids=["gdn", "hybrid"])
def test_greedy_generation_equals_full_recomputation(layer_pattern):
    model = DecoderLM(dataclasses.replace(CONFIG, layer_pattern=layer_pattern), rngs=nnx.Rngs(1))
    prompts = [[4, 9, 1, 30, 20], [7, 28, 2], list(range(3, 20))]  # lengths 5, 3, 17
    generated = generate(model, prompts, max_new_tokens=6)
    assert generated == greedy_without_cache(model, prompts, 6)
    assert len({token for row in generated for token in row}) > 3  # a non-trivial continuation
