"""LoRA over the params pytree: zero-initialised adapter is a no-op, merge/unmerge against a numpy oracle,
training changes only the adapter, reset, stacked (scanned) kernels."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.tasks.arc import PAD
from jaxlm.train.config import OptimizerConfig
from jaxlm.train.lora import (ATTENTION_PROJECTIONS, MLP_PROJECTIONS, AdapterTrainer, LoraConfig, adapted_model,
                              init_adapter, merge_adapter, pure_params, reset_adapter, target_kernels,
                              unmerge_adapter)
from jaxlm.train.sft import sft_batch


def tiny_model(scan_layers=False, seed=0):
    config = ModelConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=32,
                         max_seq_len=32, scan_layers=scan_layers)
    return DecoderLM(config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fresh_adapter_leaves_logits_unchanged_and_merge_matches_numpy(scan_layers):
    model = tiny_model(scan_layers)
    config = LoraConfig(rank=4, alpha=8.0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapter = init_adapter(params, config, seed=1)
    assert len(adapter) == 7 * (1 if scan_layers else 2)
    tokens = np.random.default_rng(0).integers(1, 16, size=(2, 9))
    forward = nnx.jit(lambda module, tokens: module(tokens))  # the adapted model shares the graphdef: one compile
    base_logits = forward(model, tokens)
    np.testing.assert_array_equal(forward(adapted_model(graphdef, params, adapter, config, rest), tokens), base_logits)
    # non-zero B: every adapted kernel is W + (alpha / r) A @ B, computed in float64
    rng = np.random.default_rng(2)
    adapter = {name: {"a": entry["a"], "b": rng.standard_normal(entry["b"].shape).astype(np.float32)}
               for name, entry in adapter.items()}
    merged, base = merge_adapter(params, adapter, config), pure_params(params)
    for name, path in target_kernels(params, config).items():
        kernel, got = base, merged
        for key in path:
            kernel, got = kernel[key], got[key]
        a, b = np.asarray(adapter[name]["a"], np.float64), np.asarray(adapter[name]["b"], np.float64)
        expected = np.asarray(kernel, np.float64) + 2.0 * np.einsum("...ir,...ro->...io", a, b)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    untouched = jax.tree.leaves(merged["embed"]) + jax.tree.leaves(merged["final_norm"])
    for got, want in zip(untouched, jax.tree.leaves(base["embed"]) + jax.tree.leaves(base["final_norm"])):
        np.testing.assert_array_equal(got, want)
    restored = unmerge_adapter(merged, adapter, config)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(base)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(forward(adapted_model(graphdef, params, adapter, config, rest), tokens), base_logits)


def test_targets_select_projections_and_reject_unknown_names():
    model = tiny_model()
    names = target_kernels(nnx.state(model, nnx.Param), LoraConfig(targets=("q_proj", "down_proj")))
    assert sorted(names) == ["layers/blocks/0/mixer/q_proj/kernel", "layers/blocks/0/mlp/down_proj/kernel",
                             "layers/blocks/1/mixer/q_proj/kernel", "layers/blocks/1/mlp/down_proj/kernel"]
    with pytest.raises(ConfigError, match="lora.targets"):
        init_adapter(nnx.state(model, nnx.Param), LoraConfig(targets=("wq",)))
    with pytest.raises(ConfigError, match="lora.rank"):
        LoraConfig(rank=0).validate()


def test_reset_adapter_redraws_a_and_zeroes_b():
    adapter = init_adapter(nnx.state(tiny_model(), nnx.Param), LoraConfig(rank=2), seed=0)
    adapter = {n: {"a": e["a"], "b": e["b"] + 1.0} for n, e in adapter.items()}
    fresh = reset_adapter(adapter, seed=5)
    for name in adapter:
        assert fresh[name]["a"].shape == adapter[name]["a"].shape
        assert not np.allclose(fresh[name]["a"], adapter[name]["a"])
        np.testing.assert_array_equal(fresh[name]["b"], 0.0)


def test_training_changes_only_the_adapter_and_fits_a_masked_mapping():
    """Learn x -> (x + 3) mod 10 on masked targets; the base params must stay bit-identical."""
    model = tiny_model(seed=3)
    base_before = jax.tree.map(np.array, pure_params(nnx.state(model, nnx.Param)))
    targets = ATTENTION_PROJECTIONS + MLP_PROJECTIONS + ("lm_head",)
    trainer = AdapterTrainer(model, LoraConfig(rank=4, alpha=16.0, targets=targets),
                             OptimizerConfig(learning_rate=3e-2, warmup_steps=2, weight_decay=0.0), steps=150)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            keys = rng.integers(1, 11, size=8)
            yield sft_batch([([k, 12, 1 + (k - 1 + 3) % 10], [False, False, True]) for k in keys], 4, PAD)

    adapter = init_adapter(trainer.base_params, trainer.config, seed=0)
    trained, history = trainer.train(adapter, batches())
    assert np.mean([h["loss"] for h in history[-10:]]) < 0.4 * history[0]["loss"]
    assert any(np.abs(np.asarray(trained[n]["b"])).max() > 0 for n in trained)
    for got, want in zip(jax.tree.leaves(pure_params(nnx.state(model, nnx.Param))), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree.leaves(trainer.base_params), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(got, want)
    keys = np.arange(1, 11)
    logits = trainer.model_with(trained)(np.stack([keys, np.full(10, 12)], axis=1))
    assert np.mean(np.asarray(logits[:, -1].argmax(-1)) == 1 + (keys - 1 + 3) % 10) >= 0.9
