"""Generation: cached decode vs full recomputation, stop tokens, seeding, compilation reuse, checkpoints."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.generate import (SamplingConfig, generate, generate_text_from_checkpoint, greedy_without_cache,
                            load_model_from_checkpoint)
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM

NEW_TOKENS = 7
# Lengths 5, 3 and 17: rows decode from different positions, and 17 pads the prompt batch to 32.
PROMPTS = [[4, 9, 1, 33, 20], [7, 58, 2], list(range(11, 28))]


def _tiny_config(**overrides):
    # init_std 0.3 makes the untrained model's greedy continuations vary from token to token.
    base = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, max_seq_len=64,
                init_std=0.3)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def model():
    return DecoderLM(_tiny_config(), rngs=nnx.Rngs(0))



@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_generation_equals_full_recomputation(model, scan_layers):
    if scan_layers:
        model = DecoderLM(_tiny_config(scan_layers=True), rngs=nnx.Rngs(1))
    generated = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    expected = greedy_without_cache(model, PROMPTS, NEW_TOKENS)
    assert generated == expected
    assert len({token for row in generated for token in row}) > 3  # a non-trivial continuation


def _stop_candidate(rows):
    """(row, index) of a token that appears nowhere else in ``rows`` and not at index 0."""
    for row_index, row in enumerate(rows):
        for index in range(1, len(row) - 1):
            others = [t for r, other in enumerate(rows) for i, t in enumerate(other) if (r, i) != (row_index, index)]
            if row[index] not in others:
                return row_index, index
    raise AssertionError(f"no usable stop token in {rows}")


def test_stop_token_ends_one_row_while_the_others_continue(model):
    free = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    row, index = _stop_candidate(free)
    stop = free[row][index]
    stopped = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=(stop,))
    expected = [r[: index + 1] if i == row else r for i, r in enumerate(free)]
    assert stopped == expected
    assert stopped[row][-1] == stop and len(stopped[row]) < NEW_TOKENS


def test_every_row_stopping_ends_generation(model):
    free = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    stops = tuple({row[1] for row in free})  # every row stops at or before its second token
    stopped = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=stops)
    for row_free, row_stopped in zip(free, stopped):
        assert 1 <= len(row_stopped) <= 2 and row_stopped[-1] in stops
        assert row_stopped == row_free[: len(row_stopped)]


def test_sampled_generation_is_seeded_and_respects_vocab_limit(model):
    sampling = SamplingConfig(temperature=1.5)
    first = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, sampling=sampling, seed=3, vocab_limit=20)
    again = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, sampling=sampling, seed=3, vocab_limit=20)
    other = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, sampling=sampling, seed=4, vocab_limit=20)
    assert first == again
    assert first != other
    assert all(0 <= token < 20 for row in first + other for token in row)
    assert all(len(row) == NEW_TOKENS for row in first)


def test_same_shapes_compile_once(model, monkeypatch):
    traces = []
    original_decode = DecoderLM.decode

    def counting_decode(self, tokens, **kwargs):
        traces.append(tokens.shape)
        return original_decode(self, tokens, **kwargs)

    monkeypatch.setattr(DecoderLM, "decode", counting_decode)
    generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=5, stop_tokens=(3,))
    traced_once = len(traces)
    assert traced_once == 2  # one prefill and one loop body: the loop is traced once, not unrolled
    # Different prompt tokens and lengths in the same length bucket, other stop tokens: no new trace.
    generate(model, [[1, 2, 3, 4, 5, 6], [10]], max_new_tokens=5, stop_tokens=(4, 9))
    assert len(traces) == traced_once


@pytest.mark.parametrize("field, kwargs", [
    ("prompts", dict(prompts=[])),
    ("prompts[1]", dict(prompts=[[1, 2], []])),
    ("prompts[0]", dict(prompts=[[1, 61]])),
    ("prompts[0]", dict(prompts=[list(range(1, 60))], max_new_tokens=6)),
    ("max_new_tokens", dict(max_new_tokens=0)),
    ("sampling.top_p", dict(sampling=SamplingConfig(temperature=1.0, top_p=0.0))),
    ("stop_tokens", dict(stop_tokens=(99,))),
    ("vocab_limit", dict(vocab_limit=62)),
])
def test_bad_requests_name_the_field(model, field, kwargs):
    request = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    prompts = request.pop("prompts")
    with pytest.raises(ConfigError) as error:
        generate(model, prompts, **request)
    assert error.value.field == field


# ----------------------------------------------------------------------------------- checkpoints


def _save_run(output_dir, seed):
    """Write a checkpoint as the trainer does: the TrainState of a model initialised with ``seed``."""
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import default_config_dict, run_config_from_dict, to_dict
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.config import MeshConfig
    from jaxlm.train.optim import make_optimizer
    from jaxlm.train.step import create_train_state

    config = default_config_dict()
    config.model.update(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                        max_seq_len=64, init_std=0.3)
    config.data.update(source="mqar", seq_len=32, batch_size=4, mqar_num_pairs=4, mqar_num_queries=4,
                       mqar_num_keys=16, mqar_num_values=16)
    config.train.update(steps=10, output_dir=str(output_dir))
    config.optimizer.update(warmup_steps=1)
    run_config = run_config_from_dict(config)
    model = DecoderLM(run_config.model, rngs=nnx.Rngs(seed))  # not the train seed: loading must overwrite
    optimizer = make_optimizer(run_config.optimizer, nnx.state(model, nnx.Param), run_config.train.steps)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    _, state, _ = create_train_state(model, optimizer, mesh)
    with Checkpointer(os.path.join(output_dir, "checkpoints"), save_every=1, async_save=False) as checkpointer:
        checkpointer.save(3, train_state=state, data_state={}, metadata={"config": to_dict(run_config)})
    return model, run_config


def test_load_model_from_checkpoint_and_generate_text(tmp_path):
    saved_model, run_config = _save_run(tmp_path, seed=7)
    model, loaded_config = load_model_from_checkpoint(str(tmp_path / "checkpoints"))
    assert loaded_config == run_config
    saved = jax.tree.leaves(nnx.state(saved_model, nnx.Param))
    loaded = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(saved) == len(loaded) > 0
    for expected, found in zip(saved, loaded):
        np.testing.assert_array_equal(np.asarray(found), np.asarray(expected))

    from jaxlm.data.tokenizers import tokenizer_for

    tokenizer = tokenizer_for(run_config.data)  # MQAR symbols: 35 ids, fewer than the model's 40
    prompts = ["k1 v2 k3 v4 k1", "k7"]
    # A run's output directory works too (its checkpoints/ folder is used).
    texts = generate_text_from_checkpoint(str(tmp_path), prompts, max_new_tokens=6, sampling=SamplingConfig())
    encoded = [tokenizer.encode(p) for p in prompts]
    tokens = generate(saved_model, encoded, max_new_tokens=6, stop_tokens=(tokenizer.eos_id,),
                      vocab_limit=tokenizer.vocab_size)
    assert all(t < tokenizer.vocab_size for row in tokens for t in row)
    assert texts == [tokenizer.decode(prompt + [t for t in row if t != tokenizer.eos_id])
                     for prompt, row in zip(encoded, tokens)]
    assert any(texts)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_from_checkpoint(str(tmp_path / "nowhere"))
