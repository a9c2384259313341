"""Train/eval steps: loss sums vs numpy, explicit-objective gradients, gradient accumulation, learning,
and sharded training on 8 fake CPU devices matching one device (stand-in model and the real DecoderLM)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.errors import ConfigError
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.parallel import make_mesh, shard_batch
from jaxlm.train.config import MeshConfig, OptimizerConfig, TrainConfig
from jaxlm.train.optim import learning_rate_schedule, make_optimizer
from jaxlm.train.step import (
    SUM_KEYS,
    create_train_state,
    make_eval_step,
    make_train_step,
    metrics_from_sums,
    token_loss_sums,
)

VOCAB, EMBED, MLP = 48, 16, 24


class StandIn(nnx.Module):
    """embed -> residual tanh MLP (embed -> mlp -> embed) -> scale -> unembed, with the decoder's logical names."""

    def __init__(self, *, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(0.5)
        self.embedding = nnx.Param(normal(rngs.params(), (VOCAB, EMBED)), out_sharding=("vocab", "embed"))
        self.up = nnx.Param(normal(rngs.params(), (EMBED, MLP)), out_sharding=("embed", "mlp"))
        self.down = nnx.Param(normal(rngs.params(), (MLP, EMBED)), out_sharding=("mlp", "embed"))
        self.scale = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (EMBED,)), out_sharding=("embed",))
        self.unembed = nnx.Param(normal(rngs.params(), (EMBED, VOCAB)), out_sharding=("embed", "vocab"))

    def __call__(self, tokens, *, positions, segment_ids):
        x = self.embedding[...][tokens]  # [B, T, E]
        x = x + 0.01 * positions[..., None] * (segment_ids[..., None] > 0)
        x = x + jnp.tanh(x @ self.up[...]) @ self.down[...]
        return ((x * self.scale[...]) @ self.unembed[...]).astype(jnp.float32)  # [B, T, V]


def tiny_decoder(*, rngs: nnx.Rngs) -> DecoderLM:
    config = ModelConfig(vocab_size=VOCAB, d_model=EMBED, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=MLP,
                         max_seq_len=32)
    return DecoderLM(config, rngs=rngs)


def random_batch(seed: int, rows: int, length: int = 11, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    return {
        "tokens": tokens,
        "targets": rng.integers(0, vocab, (rows, length)).astype(np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        "segment_ids": (1 + (np.arange(length) >= length // 2)).astype(np.int32)[None].repeat(rows, 0),
        # uneven scored-token counts per row, so micro-batches carry different weights
        "loss_mask": (rng.random((rows, length)) < rng.uniform(0.3, 0.95, (rows, 1))).astype(np.float32),
    }


def learnable_batch(seed: int, rows: int, length: int = 11) -> dict[str, np.ndarray]:
    batch = random_batch(seed, rows, length)
    batch["targets"] = (batch["tokens"] * 5 + 3) % VOCAB
    return batch


def single_device_mesh():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def make_batches(kind: str, seeds: tuple[int, ...], rows: int, length: int) -> list[dict[str, np.ndarray]]:
    make = {"random": random_batch, "learnable": learnable_batch}[kind]
    return [make(seed, rows, length) for seed in seeds]


DEFAULT_OPTIMIZER = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, eps=1e-3)


@functools.lru_cache(maxsize=None)
def run_training(model_factory, mesh_shape, batch_spec, train_config, optimizer_config=DEFAULT_OPTIMIZER):
    """Train a fresh model (seed 0) on ``make_batches(*batch_spec)`` on a mesh of ``mesh_shape``
    ((data, fsdp, tensor), or None for one device). Returns (final state, metric dicts, model).
    Cached: runs shared by several tests compile and train once."""
    mesh = single_device_mesh() if mesh_shape is None else make_mesh(MeshConfig(*mesh_shape))
    model = model_factory(rngs=nnx.Rngs(0))
    optimizer = make_optimizer(optimizer_config, nnx.state(model, nnx.Param), total_steps=50)
    graphdef, state, shardings = create_train_state(model, optimizer, mesh)
    train_step = make_train_step(graphdef, optimizer, mesh, train_config, shardings)
    history = []
    for batch in make_batches(*batch_spec):
        previous_params = state.params
        state, metrics = train_step(state, shard_batch(batch, mesh))
        history.append({key: float(value) for key, value in metrics.items()})
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(previous_params))  # the state was donated
    return state, history, model


def flat_params(state) -> dict:
    return {path: np.asarray(value.get_value()) for path, value in nnx.to_flat_state(state.params)}


def numpy_sums(logits, batch, z_loss_weight) -> dict[str, float]:
    """float64 oracle of the masked loss sums."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_normalizer = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)  # [B, T]
    target_logit = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(np.float64)
    return {
        "loss_sum": np.sum((log_normalizer - target_logit) * mask),
        "z_loss_sum": z_loss_weight * np.sum(log_normalizer ** 2 * mask),
        "accuracy_sum": np.sum((logits.argmax(-1) == batch["targets"]) * mask),
        "scored_tokens": mask.sum(),
    }


def test_token_loss_sums_match_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (3, 13, 37)).astype(np.float32)
    batch = {"targets": rng.integers(0, 37, (3, 13)).astype(np.int32),
             "loss_mask": (rng.random((3, 13)) < 0.6).astype(np.float32)}
    batch["targets"][0, :4] = logits[0, :4].argmax(-1)  # some correct predictions
    got = token_loss_sums(jnp.asarray(logits), batch["targets"], batch["loss_mask"], z_loss_weight=1e-2)
    want = numpy_sums(logits, batch, 1e-2)
    assert set(got) == set(SUM_KEYS)
    for key in SUM_KEYS:
        np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5)
    assert want["accuracy_sum"] >= 1
    metrics = metrics_from_sums(got)
    np.testing.assert_allclose(float(metrics["loss"]), want["loss_sum"] / want["scored_tokens"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["z_loss"]), want["z_loss_sum"] / want["scored_tokens"], rtol=1e-5)


def test_train_step_metrics_and_gradient_match_explicit_objective():
    z_weight = 3e-2
    batch_spec = ("random", (5, 5), 6, 11)
    batch = make_batches(*batch_spec)[0]
    model = StandIn(rngs=nnx.Rngs(0))
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    want = numpy_sums(logits, batch, z_weight)
    scored = want["scored_tokens"]

    def explicit_objective(model):  # (sum m CE + w sum m lse^2) / N, written out
        out = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        log_normalizer = jax.scipy.special.logsumexp(out, axis=-1)
        target_logit = jnp.take_along_axis(out, batch["targets"][..., None], -1)[..., 0]
        per_token = (log_normalizer - target_logit) + z_weight * log_normalizer ** 2
        return jnp.sum(per_token * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    grads = nnx.grad(explicit_objective)(model)
    want_grad_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))

    optimizer_config = OptimizerConfig(learning_rate=1e-2, warmup_steps=4)
    state, history, model = run_training(StandIn, None, batch_spec, TrainConfig(z_loss_weight=z_weight),
                                         optimizer_config)
    first = history[0]
    np.testing.assert_allclose(first["loss"], want["loss_sum"] / scored, rtol=1e-5)
    np.testing.assert_allclose(first["z_loss"], want["z_loss_sum"] / scored, rtol=1e-5)
    np.testing.assert_allclose(first["accuracy"], want["accuracy_sum"] / scored, rtol=1e-5)
    assert first["scored_tokens"] == scored
    np.testing.assert_allclose(first["grad_norm"], want_grad_norm, rtol=1e-5)
    schedule = learning_rate_schedule(optimizer_config, 50)
    assert [m["learning_rate"] for m in history] == pytest.approx([float(schedule(0)), float(schedule(1))])
    assert history[1]["learning_rate"] > 0
    assert int(state.step) == 2
    # the model's own arrays were copied into the state, not donated with it
    assert not model.up.get_value().is_deleted()


def full_batch_reference(model_factory, batch_spec, optimizer_config, z_loss_weight=0.0):
    return run_training(model_factory, None, batch_spec, TrainConfig(z_loss_weight=z_loss_weight), optimizer_config)


def assert_same_training(reference, candidate, rtol=1e-5):
    """Same losses, grad norms and (after the last step) params, up to float32 rounding."""
    (ref_state, ref_history, _), (state, history, _) = reference, candidate
    for ref, got in zip(ref_history, history, strict=True):
        for key in ("loss", "z_loss", "accuracy", "grad_norm", "scored_tokens"):
            np.testing.assert_allclose(got[key], ref[key], rtol=rtol, atol=1e-7, err_msg=key)
    want, got = flat_params(ref_state), flat_params(state)
    for path in want:
        scale = np.max(np.abs(want[path]))
        np.testing.assert_allclose(got[path], want[path], rtol=rtol, atol=rtol * scale, err_msg=str(path))


ACCUM_OPTIMIZER = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=0.05, grad_clip_norm=0.0)


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_full_batch(accum):
    batch_spec = ("random", (11, 12, 13), 12, 11)
    reference = full_batch_reference(StandIn, batch_spec, ACCUM_OPTIMIZER, z_loss_weight=1e-3)
    accumulated = run_training(StandIn, None, batch_spec, TrainConfig(grad_accum_steps=accum, z_loss_weight=1e-3),
                               ACCUM_OPTIMIZER)
    assert_same_training(reference, accumulated)
    # the micro-batches carry different numbers of scored tokens, so a per-micro-batch mean would differ
    mask = make_batches(*batch_spec)[0]["loss_mask"]
    assert len({mask[i::accum].sum() for i in range(accum)}) > 1


def test_loss_decreases_on_a_learnable_task():
    optimizer_config = OptimizerConfig(learning_rate=3e-2, warmup_steps=3, weight_decay=0.0)
    _, history, _ = run_training(StandIn, None, ("learnable", tuple(range(30)), 8, 11),
                                 TrainConfig(grad_accum_steps=2), optimizer_config)
    losses = [m["loss"] for m in history]
    assert np.mean(losses[-3:]) < 0.35 * np.mean(losses[:3]), losses
    assert np.mean([m["accuracy"] for m in history[-3:]]) > 0.5


def test_eval_step_sums_match_numpy():
    mesh = single_device_mesh()
    model = StandIn(rngs=nnx.Rngs(0))
    batch = random_batch(21, rows=8)
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    want = numpy_sums(logits, batch, 2e-2)
    optimizer = make_optimizer(OptimizerConfig(warmup_steps=1), nnx.state(model, nnx.Param), 10)
    graphdef, state, shardings = create_train_state(model, optimizer, mesh)
    eval_step = make_eval_step(graphdef, mesh, shardings, TrainConfig(grad_accum_steps=2, z_loss_weight=2e-2))
    sums = eval_step(state, shard_batch(batch, mesh))
    for key in SUM_KEYS:
        np.testing.assert_allclose(float(sums[key]), want[key], rtol=1e-5, err_msg=key)
    assert not state.params["up"].get_value().is_deleted()  # eval does not donate

    train_step = make_train_step(graphdef, optimizer, mesh, TrainConfig(grad_accum_steps=4), shardings)
    with pytest.raises(ConfigError) as info:
        train_step(state, shard_batch(random_batch(0, rows=6), mesh))
    assert info.value.field == "train.grad_accum_steps"


# ---- sharded training on 8 fake CPU devices ------------------------------------------------------

@pytest.mark.parametrize("mesh_shape", [(4, 1, 2), (2, 2, 2)])
def test_sharded_training_matches_single_device(mesh_shape):
    batch_spec = ("random", (31, 32, 33), 16, 11)
    train_config = TrainConfig(grad_accum_steps=2, z_loss_weight=1e-3)
    reference = run_training(StandIn, None, batch_spec, train_config)
    sharded = run_training(StandIn, mesh_shape, batch_spec, train_config)
    assert_same_training(reference, sharded)

    state = sharded[0]
    spec = {"embedding": P("tensor", "fsdp"), "up": P("fsdp", "tensor"), "down": P("tensor", "fsdp"),
            "scale": P("fsdp"), "unembed": P("fsdp", "tensor")}
    adam_state = state.opt_state[1].inner_state[0]  # chain(clip, inject_hyperparams(adamw)) -> adam moments
    for name, want in spec.items():
        assert state.params[name].get_value().sharding.spec == want, name
        assert adam_state.mu[name].get_value().sharding.spec == want, name
        assert adam_state.nu[name].get_value().sharding.spec == want, name
    embedding = state.params["embedding"].get_value()
    assert {s.data.shape for s in embedding.addressable_shards} == {(VOCAB // 2, EMBED // mesh_shape[1])}
    assert state.step.sharding.spec == P()


def test_decoder_lm_sharded_with_accumulation_matches_single_device_full_batch():
    """The real DecoderLM: a 2x2x2 mesh with 2 micro-batches == one device, one full batch."""
    batch_spec = ("random", (41, 42), 8, 9)
    reference = run_training(tiny_decoder, None, batch_spec, TrainConfig())
    sharded = run_training(tiny_decoder, (2, 2, 2), batch_spec, TrainConfig(grad_accum_steps=2))
    assert_same_training(reference, sharded)
    params = sharded[0].params
    assert params["embed"]["embedding"].get_value().sharding.spec == P("tensor", "fsdp")
    q_proj = params["layers"]["blocks"][0]["mixer"]["q_proj"]["kernel"].get_value()
    assert q_proj.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in q_proj.addressable_shards} == {(EMBED // 2, EMBED // 2)}
