"""PaTHAttention layer: shapes, causality, prefill + decode steps == full forward, and greedy generation of a
DecoderLM with PaTH mixers == full recomputation."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.generate import generate, greedy_without_cache
from jaxlm.layers.path_attention import PaTHAttention  # importing it registers the "path" mixer
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.models.mixer_options import PaTHOptions

GATES = pytest.mark.parametrize("forget_gate", [True, False], ids=["gate", "no_gate"])


def tiny_config(forget_gate=True, **overrides):
    # init_std 0.3 makes the untrained model's greedy continuations vary from token to token.
    base = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, max_seq_len=64,
                init_std=0.3, mixer="path", path=PaTHOptions(low_rank=8, block_size=8, forget_gate=forget_gate))
    return ModelConfig(**{**base, **overrides}).validate()


def random_activations(seed, batch, length, width=32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, width)), jnp.float32)


def test_output_shape_parameters_and_causality():
    layer = PaTHAttention(tiny_config(), 0, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda layer, x: layer(x, positions=None)[0])
    x = random_activations(0, 2, 19)
    y = forward(layer, x)
    assert y.shape == (2, 19, 32) and y.dtype == jnp.float32
    assert layer.direction_conv.shape == (3, 2 * 8) and layer.beta_proj.kernel.shape == (32, 2)
    assert layer.forget_proj.kernel.shape == (32, 4)
    changed = forward(layer, x.at[:, 11].add(1.0))
    np.testing.assert_allclose(np.asarray(changed[:, :11]), np.asarray(y[:, :11]), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(changed[:, 11:] - y[:, 11:])).max(axis=-1).min() > 1e-4


def test_prefill_and_decode_steps_equal_full_forward():
    """Rows with prompts of 5 and 11 tokens (padded to 13 with junk) then 4 decode steps each (forget gate on;
    the generation tests below cover both settings)."""
    layer = PaTHAttention(tiny_config(), 0, rngs=nnx.Rngs(1))
    prompt_lengths, padded_length, steps = np.array([5, 11]), 13, 4
    x = random_activations(2, 2, 11 + steps)  # every row's real sequence
    junk = random_activations(3, 2, padded_length)
    is_prompt = np.arange(padded_length)[None] < prompt_lengths[:, None]  # [B, P]
    prompt = jnp.where(is_prompt[..., None], x[:, :padded_length], junk)  # [B, P, d]; junk after each prompt

    @nnx.jit
    def run(layer, prompt, segment_ids, x):
        cache = layer.init_cache(2, 24, jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(padded_length), (2, padded_length))
        prefill, cache = layer(prompt, positions=positions, segment_ids=segment_ids, cache=cache)
        outputs = []
        for step in range(steps):
            token_positions = jnp.asarray(prompt_lengths + step)[:, None]  # [B, 1]
            token = jnp.take_along_axis(x, token_positions[..., None], axis=1)  # [B, 1, d]
            out, cache = layer(token, positions=token_positions, cache=cache)
            outputs.append(out[:, 0])
        full, _ = layer(x, positions=None)
        return prefill, jnp.stack(outputs, 1), full, cache["length"]

    prefill, decoded, full, lengths = run(layer, prompt, jnp.asarray(is_prompt, jnp.int32), x)
    np.testing.assert_array_equal(np.asarray(lengths), prompt_lengths + steps)
    for row, length in enumerate(prompt_lengths):
        np.testing.assert_allclose(np.asarray(prefill[row, :length]), np.asarray(full[row, :length]),
                                   rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(decoded[row]), np.asarray(full[row, length:length + steps]),
                                   rtol=2e-5, atol=2e-5)


def test_packed_segments_equal_separate_sequences():
    layer = PaTHAttention(tiny_config(), 0, rngs=nnx.Rngs(2))
    x = random_activations(4, 1, 20)
    segment_ids = jnp.asarray(np.repeat([[1, 2]], [9, 11], axis=1))

    @nnx.jit
    def packed_and_separate(layer, x, segment_ids):
        packed = layer(x, positions=None, segment_ids=segment_ids)[0]
        return packed, [layer(x[:, :9], positions=None)[0], layer(x[:, 9:], positions=None)[0]]

    packed, separate = packed_and_separate(layer, x, segment_ids)
    np.testing.assert_allclose(np.asarray(packed), np.asarray(jnp.concatenate(separate, 1)), rtol=2e-5, atol=2e-5)



@GATES
def test_greedy_generation_equals_full_recomputation(forget_gate):
    model = DecoderLM(tiny_config(forget_gate), rngs=nnx.Rngs(0))
    prompts = [[4, 9, 1, 33, 20], [7, 58, 2], list(range(11, 28))]  # padded to 32 in the prefill
    generated = generate(model, prompts, max_new_tokens=6)
    assert generated == greedy_without_cache(model, prompts, 6)
    assert len({token for row in generated for token in row}) > 3  # a non-trivial continuation


def test_bad_options_and_pallas_are_clear_errors():
    with pytest.raises(ConfigError, match="model.path.impl"):
        tiny_config(path=PaTHOptions(impl="flash"))
    with pytest.raises(ConfigError, match="model.path.low_rank"):
        tiny_config(path=PaTHOptions(low_rank=0))
    layer = PaTHAttention(tiny_config(path=PaTHOptions(low_rank=8, impl="pallas")), 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim=8 must be a power of two"):  # the kernel's shape error
        layer(random_activations(0, 1, 4), positions=None)
