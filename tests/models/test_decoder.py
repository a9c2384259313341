"""DecoderLM: shapes/dtypes, causality, packing, scan == unrolled, remat, cached decoding, tying, config errors."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.models import DecoderLM, ModelConfig

CONFIG = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                     init_std=0.1, rope_theta=500.0)


def make_model(seed=0, **changes):
    return DecoderLM(dataclasses.replace(CONFIG, **changes), rngs=nnx.Rngs(seed))


def random_tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=shape), jnp.int32)


@nnx.jit
def forward(model, tokens, positions, segment_ids):
    return model(tokens, positions=positions, segment_ids=segment_ids)


@nnx.jit
def decode(model, tokens, positions, cache):
    return model.decode(tokens, positions=positions, cache=cache)


def copy_scanned_into_unrolled(scanned: DecoderLM, unrolled: DecoderLM) -> None:
    """Layer i of the unrolled model gets stack row i // period of scanned block i % period."""
    source = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    target = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    period = len(scanned.config.mixer_pattern)
    stacked_blocks = source["layers"].pop("groups")["blocks"]
    target["layers"]["blocks"] = {
        i: jax.tree.map(lambda a, i=i: a[i // period], stacked_blocks[i % period])
        for i in range(unrolled.config.num_layers)
    }
    target.update({key: value for key, value in source.items() if key != "layers"})
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, target)
    nnx.update(unrolled, state)


def checkpoint_policies(model: DecoderLM) -> list[str]:
    """The policies of the rematerialised (``jax.checkpoint``) regions in the model's forward jaxpr."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(jnp.ones((1, 5), jnp.int32)))(state)
    return re.findall(r"policy=([^\s\]]+)", str(jaxpr))


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_forward_shapes_and_dtypes(compute_dtype):
    model = make_model(compute_dtype=compute_dtype)
    tokens = random_tokens(0, (3, 13))
    logits = forward(model, tokens, None, None)
    assert logits.shape == (3, 13, 61) and logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    reference = forward(make_model(compute_dtype="float32"), tokens, None, None)  # same seed, same weights
    tolerance = 1e-5 if compute_dtype == "float32" else 0.1
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=tolerance)
    assert float(jnp.std(logits)) > 0.1  # not a degenerate output


def test_changing_a_token_never_changes_earlier_logits():
    model = make_model()
    tokens = random_tokens(1, (2, 17))
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % 61)
    before, after = forward(model, tokens, None, None), forward(model, changed, None, None)
    np.testing.assert_array_equal(np.asarray(before[:, :9]), np.asarray(after[:, :9]))
    assert float(jnp.abs(before[:, 9:] - after[:, 9:]).min(axis=-1).max()) > 1e-4


def test_packed_segments_equal_separate_forwards():
    model = make_model()
    first, second = random_tokens(2, (1, 7)), random_tokens(3, (1, 9))
    packed = jnp.concatenate([first, second, jnp.zeros((1, 3), jnp.int32)], axis=1)  # 3 padding tokens
    segment_ids = jnp.asarray([[1] * 7 + [2] * 9 + [0] * 3], jnp.int32)
    positions = jnp.asarray([list(range(7)) + list(range(9)) + list(range(3))], jnp.int32)
    logits = forward(model, packed, positions, segment_ids)
    np.testing.assert_allclose(np.asarray(logits[:, :7]), np.asarray(forward(model, first, None, None)), atol=2e-5)
    np.testing.assert_allclose(np.asarray(logits[:, 7:16]), np.asarray(forward(model, second, None, None)), atol=2e-5)


def test_scanned_and_unrolled_compute_the_same_function():
    scanned = make_model(seed=1, num_layers=4, scan_layers=True)
    unrolled = make_model(seed=2, num_layers=4)
    assert scanned.layers.groups.blocks[0].mixer.q_proj.kernel.get_metadata()["out_sharding"] == (
        "layers", "embed", "heads")
    tokens = random_tokens(4, (2, 11))
    assert not np.allclose(forward(scanned, tokens, None, None), forward(unrolled, tokens, None, None), atol=1e-3)
    copy_scanned_into_unrolled(scanned, unrolled)
    np.testing.assert_allclose(np.asarray(forward(scanned, tokens, None, None)),
                               np.asarray(forward(unrolled, tokens, None, None)), rtol=1e-5, atol=1e-5)


def test_remat_gives_same_loss_and_gradients():
    """Unrolled "dots" and scanned "full" remat against unrolled without remat, all with the same weights."""
    tokens = random_tokens(5, (2, 10))

    @nnx.jit
    def loss_and_grads(model):
        def loss(model):
            logits = model(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))
        loss_value, grads = nnx.value_and_grad(loss)(model)
        return loss_value, nnx.to_pure_dict(grads)

    scanned_full = make_model(seed=3, scan_layers=True, remat="full")
    plain, unrolled_dots = make_model(seed=4), make_model(seed=5, remat="dots")
    copy_scanned_into_unrolled(scanned_full, plain)
    copy_scanned_into_unrolled(scanned_full, unrolled_dots)
    assert checkpoint_policies(plain) == []
    assert checkpoint_policies(unrolled_dots) == ["DotsSaveable(only_if_no_batch_dims=True)"] * 2  # one per layer
    assert checkpoint_policies(scanned_full) == ["None"]  # one per scanned group
    base_loss, base_grads = loss_and_grads(plain)
    assert float(jnp.abs(base_grads["embed"]["embedding"]).max()) > 0

    def assert_close(grads, expected):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7),
                     grads, expected)

    dots_loss, dots_grads = loss_and_grads(unrolled_dots)
    np.testing.assert_allclose(float(dots_loss), float(base_loss), rtol=1e-6)
    assert_close(dots_grads, base_grads)

    full_loss, full_grads = loss_and_grads(scanned_full)
    np.testing.assert_allclose(float(full_loss), float(base_loss), rtol=1e-6)
    stacked_grads = full_grads.pop("layers")["groups"]["blocks"][0]
    for layer in range(2):
        assert_close(jax.tree.map(lambda g: g[layer], stacked_grads), base_grads["layers"]["blocks"][layer])
    assert_close(full_grads, {key: value for key, value in base_grads.items() if key != "layers"})


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_then_decode_steps_match_full_forward(scan_layers):
    model = make_model(seed=4, num_layers=2, scan_layers=scan_layers)
    prompt_lengths = np.array([5, 9, 3])
    padded_length, steps = 9, 4
    sequences = random_tokens(6, (3, padded_length + steps))
    full = np.asarray(forward(model, sequences, None, None))  # [B, 13, V]

    prompts = jnp.where(jnp.arange(padded_length)[None] < prompt_lengths[:, None], sequences[:, :padded_length], 0)
    cache = model.init_cache(3, 16)
    positions = jnp.broadcast_to(jnp.arange(padded_length), (3, padded_length))
    prefill, cache = decode(model, prompts, positions, cache)
    for row, length in enumerate(prompt_lengths):
        np.testing.assert_allclose(np.asarray(prefill)[row, :length], full[row, :length], rtol=1e-5, atol=1e-5)
    for step in range(steps):
        step_positions = jnp.asarray(prompt_lengths + step, jnp.int32)[:, None]  # [B, 1]
        step_tokens = jnp.take_along_axis(sequences, step_positions, axis=1)
        logits, cache = decode(model, step_tokens, step_positions, cache)
        expected = full[np.arange(3), prompt_lengths + step]  # [B, V]
        np.testing.assert_allclose(np.asarray(logits)[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_use_the_embedding_as_output_layer():
    model = make_model(tie_embeddings=True)
    assert not hasattr(model, "lm_head")
    assert make_model().num_params() - model.num_params() == 32 * 61
    tokens = random_tokens(7, (2, 6))
    normed_hidden = nnx.jit(lambda m, t: m.final_norm(m.layers(m.embed(t), positions=None)[0]))(model, tokens)
    expected = np.asarray(normed_hidden) @ np.asarray(model.embed.embedding[...]).T
    np.testing.assert_allclose(np.asarray(forward(model, tokens, None, None)), expected, rtol=1e-4, atol=1e-5)


def test_num_params_counts_every_weight():
    d, mlp, vocab, kv = 32, 48, 61, 2 * 8
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * mlp + 2 * d
    model = make_model()
    assert model.num_params() == 2 * per_layer + 2 * vocab * d + d
    assert model.num_params(exclude_embeddings=True) == 2 * per_layer + d
    assert make_model(num_layers=4, scan_layers=True).num_params() == 4 * per_layer + 2 * vocab * d + d


def test_model_renders_with_treescope():
    text = treescope.render_to_text(make_model())
    for name in ("embedding", "q_proj", "o_proj", "gate_proj", "down_proj", "final_norm", "lm_head"):
        assert name in text


@pytest.mark.parametrize("changes,field", [
    ({"mixer": "no_such_mixer"}, "model.mixer"),
    ({"layer_pattern": ("attention", "bogus")}, "model.layer_pattern"),
    ({"num_layers": 3, "layer_pattern": ("attention", "attention"), "scan_layers": True}, "model.num_layers"),
    ({"remat": "some"}, "model.remat"),
    ({"num_kv_heads": 3}, "model.num_kv_heads"),
])
def test_bad_config_is_rejected_by_validate_and_model(changes, field):
    config = dataclasses.replace(CONFIG, **changes)
    with pytest.raises(ConfigError, match=field) as error:
        config.validate()
    assert error.value.field == field
    with pytest.raises(ConfigError, match=field):
        DecoderLM(config, rngs=nnx.Rngs(0))
