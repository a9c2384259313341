"""functional(model) -> (params, apply): equal to the module, and jit/grad/vmap-able."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models import DecoderLM, ModelConfig
from jaxlm.pure import functional, to_module

CONFIG = ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, init_std=0.1)


def next_token_loss(logits, tokens):
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


def test_apply_matches_module_and_jits():
    model = DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    params, apply = functional(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 37, size=(2, 11)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 6 + [2] * 5, [1] * 11], jnp.int32)
    expected = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, segment_ids)
    logits = jax.jit(apply)(params, tokens, segment_ids=segment_ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_grad_of_apply_matches_module_grad():
    model = DecoderLM(CONFIG, rngs=nnx.Rngs(1))
    params, apply = functional(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 37, size=(2, 9)), jnp.int32)
    grads = jax.jit(jax.grad(lambda p: next_token_loss(apply(p, tokens), tokens)))(params)
    module_grads = nnx.jit(nnx.grad(lambda m: next_token_loss(m(tokens), tokens)))(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8),
                 grads, module_grads)
    assert float(jnp.abs(grads["lm_head"]["kernel"][...]).max()) > 0


def test_vmap_over_parameter_sets_and_merge_back():
    model = DecoderLM(CONFIG, rngs=nnx.Rngs(2))
    params, apply = functional(model)
    other_params, _ = functional(DecoderLM(CONFIG, rngs=nnx.Rngs(3)))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 37, size=(1, 7)), jnp.int32)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other_params)
    batched = jax.jit(jax.vmap(lambda p: apply(p, tokens)))(stacked)  # [2, 1, 7, V]
    single = jax.jit(apply)
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(single(params, tokens)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(single(other_params, tokens)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(batched[0]), np.asarray(batched[1]), atol=1e-3)

    merged = to_module(other_params, like=model)
    assert isinstance(merged, DecoderLM) and merged is not model
    np.testing.assert_array_equal(np.asarray(merged.embed.embedding[...]),
                                  np.asarray(other_params["embed"]["embedding"][...]))
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), np.asarray(params["embed"]["embedding"][...]))
