"""Hugging Face Llama import: our logits equal transformers' on a tiny randomly initialised Llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm.convert import llama_from_hf, model_config_from_hf, to_unrolled  # noqa: E402
from jaxlm.errors import ConfigError  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, max_position_embeddings=256)


def _hf_llama(seed=0, **overrides):
    """A tiny LlamaForCausalLM with every weight random (norm scales and biases too, not their 1/0 init)."""
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.15 * torch.randn_like(parameter))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy().astype(np.float64)


def _assert_logits_match(ours, reference):
    ours = np.asarray(ours, np.float64)
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error < 1e-4, f"relative max error {error}"


# Batch 3, odd length 37: a random token batch.
TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(3, 37))


@pytest.mark.parametrize("tied, scan_layers, attention_bias", [
    (False, False, False),
    (True, False, False),
    (False, True, True),
    (True, True, False),
], ids=["untied", "tied", "untied-scanned-bias", "tied-scanned"])
def test_logits_match_transformers(tied, scan_layers, attention_bias):
    hf_model = _hf_llama(tie_word_embeddings=tied, attention_bias=attention_bias)
    model = llama_from_hf(hf_model, scan_layers=scan_layers)
    assert model.config.tie_embeddings == tied and model.config.scan_layers == scan_layers
    _assert_logits_match(model(jnp.asarray(TOKENS, jnp.int32)), _hf_logits(hf_model, TOKENS))


def test_state_dict_with_config_and_bfloat16_weights():
    hf_model = _hf_llama(seed=1)
    bf16_state = {name: tensor.to(torch.bfloat16) for name, tensor in hf_model.state_dict().items()}
    model = llama_from_hf(bf16_state, hf_model.config)
    # The bf16-rounded weights, in float32, are exactly what the converter must load.
    reference = transformers.LlamaForCausalLM(hf_model.config).eval()
    reference.load_state_dict({name: tensor.float() for name, tensor in bf16_state.items()})
    _assert_logits_match(model(jnp.asarray(TOKENS[:, :20], jnp.int32)), _hf_logits(reference, TOKENS[:, :20]))


def test_config_fields_are_mapped():
    hf_config = transformers.LlamaConfig(**{**TINY, "head_dim": 32, "tie_word_embeddings": True,
                                            "rope_theta": 5e5, "attention_bias": True})
    config = model_config_from_hf(hf_config, compute_dtype="bfloat16")
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.num_kv_heads) == (
        128, 64, 2, 4, 2)
    assert (config.head_dim, config.mlp_dim, config.max_seq_len) == (32, 96, 256)
    assert config.norm_eps == 1e-5 and config.rope_theta == 5e5
    assert config.tie_embeddings and config.attention_bias and config.compute_dtype == "bfloat16"


@pytest.mark.parametrize("field, overrides", [
    ("hf_config.rope_scaling", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("hf_config.mlp_bias", dict(mlp_bias=True)),
    ("hf_config.hidden_act", dict(hidden_act="gelu")),
])
def test_unsupported_configs_raise(field, overrides):
    with pytest.raises(ConfigError) as error:
        model_config_from_hf(transformers.LlamaConfig(**{**TINY, **overrides}))
    assert error.value.field == field


def test_missing_unexpected_and_misshaped_weights_are_named():
    hf_model = _hf_llama(seed=2)
    state = dict(hf_model.state_dict())

    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        llama_from_hf(missing, hf_model.config)

    unexpected = {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(ConfigError, match=r"q_norm"):
        llama_from_hf(unexpected, hf_model.config)

    misshaped = {**state, "model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        llama_from_hf(misshaped, hf_model.config)

    with pytest.raises(ConfigError, match="hf_config"):
        llama_from_hf(state)


def test_to_ladder_rewires_the_last_layers_with_the_same_weights():
    from flax import nnx

    from jaxlm.convert import to_ladder

    hf_model = _hf_llama(seed=2, num_hidden_layers=3)
    model = llama_from_hf(hf_model)
    converted = to_ladder(model, 2)
    assert converted.config.residual_mode == "ladder" and converted.config.ladder_start_layer == 1
    original = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for ours, theirs in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(converted, nnx.Param))),
                            jax.tree.leaves(original)):
        np.testing.assert_array_equal(ours, theirs)
    tokens = jnp.asarray(TOKENS[:, :11], jnp.int32)
    # Written out: layer 0 standard; then r_j = r_{j-1} + h_j(r_{j-2}) over the 4 modules of layers 1 and 2.
    blocks = model.layers.blocks
    x, _ = blocks[0](model.embed(tokens), positions=None)
    stream = [x, x]
    for block in blocks[1:]:
        for module in (lambda v, b=block: b.mixer_branch(v, positions=None)[0], block.mlp_branch):
            stream.append(stream[-1] + module(stream[-2]))
    expected = model.lm_head(model.final_norm(stream[-1]))
    np.testing.assert_allclose(converted(tokens), expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(converted(tokens) - model(tokens)).max()) > 1e-3  # a different function zero-shot
    with pytest.raises(ConfigError, match="num_ladder_layers"):
        to_ladder(model, 4)
    with pytest.raises(ConfigError, match="residual_mode"):
        to_ladder(converted, 1)


def test_to_unrolled_computes_the_scanned_models_function():
    from flax import nnx

    from jaxlm.models import DecoderLM, ModelConfig

    config = ModelConfig(vocab_size=32, d_model=16, num_layers=3, num_heads=2, num_kv_heads=1, mlp_dim=32,
                         max_seq_len=16, scan_layers=True)
    scanned = DecoderLM(config, rngs=nnx.Rngs(3))
    unrolled = to_unrolled(scanned)
    assert not unrolled.config.scan_layers
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, size=(2, 9)), jnp.int32)
    np.testing.assert_allclose(np.asarray(unrolled(tokens)), np.asarray(scanned(tokens)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="model.scan_layers"):
        to_unrolled(unrolled)
