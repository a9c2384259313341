"""TTT for ARC: leave-one-out construction, augmented items and their loss mask, augmented inference mapped
back and voted (with a stand-in model that knows the rule), and a CPU smoke run of a per-task adapter."""

import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.tasks.arc import END, IN, OUT, ArcTask, answer_tokens, decode_grid, training_example
from jaxlm.tasks.arc_augment import ALL_TRANSFORMS
from jaxlm.tasks.arc_generator import generate_task
from jaxlm.train import ttt
from jaxlm.train.lora import LoraConfig
from jaxlm.train.ttt import TTTConfig, evaluate, example_batches, inference_prompts, leave_one_out, ttt_examples


def small_task(seed=0, family="colour_map", num_demos=3):
    return generate_task(family, np.random.default_rng(seed), num_demos=num_demos, min_side=2, max_side=3)


def test_leave_one_out_holds_out_each_demo_once():
    task = small_task(num_demos=4)
    loo = leave_one_out(task)
    assert len(loo) == 4
    for index, held_out in enumerate(loo):
        assert held_out.tests[0] is task.demos[index]
        assert [pair for pair in held_out.demos] == [p for j, p in enumerate(task.demos) if j != index]
    with pytest.raises(ConfigError, match="at least 2 demos"):
        leave_one_out(ArcTask("one", demos=task.demos[:1], tests=task.tests))


def test_ttt_items_without_augmentation_are_the_leave_one_out_tasks_with_their_masks():
    task = small_task()
    items = ttt_examples(task, TTTConfig(augment=False), np.random.default_rng(0))
    expected = [training_example(t.demos, t.tests[0]) for t in leave_one_out(task)]
    assert len(items) == 3
    for (tokens, learn), (want_tokens, want_learn) in zip(items, expected):
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(learn, want_learn)
        # learned tokens are exactly the outputs (and END) of the 2nd demo and the query
        outs = np.flatnonzero(tokens == OUT)
        ends = np.flatnonzero(tokens == END)
        want = np.zeros(len(tokens), bool)
        for out_at, end_at in zip(outs[1:], ends[1:]):
            want[out_at + 1: end_at + 1] = True
        np.testing.assert_array_equal(learn, want)


def test_augmented_items_are_distinct_capped_and_fit_seq_len():
    task = small_task()
    config = TTTConfig(seq_len=90, max_items=10)
    items = ttt_examples(task, config, np.random.default_rng(0))
    assert len(items) == 10
    assert len({tokens.tobytes() for tokens, _ in items}) == 10
    assert all(len(tokens) <= 91 for tokens, _ in items)
    every = ttt_examples(task, TTTConfig(seq_len=90), np.random.default_rng(0))
    assert 10 < len(every) <= 3 * len(ALL_TRANSFORMS)
    config = TTTConfig(seq_len=400, copies_per_transform=3, max_items=1000)
    copies = ttt_examples(task, config, np.random.default_rng(0))
    assert len(every) < len(copies) <= 3 * 3 * len(ALL_TRANSFORMS)
    batch = next(example_batches(items, 4, 90, np.random.default_rng(0)))
    assert batch["tokens"].shape == (4, 90) and batch["loss_mask"].sum() > 0


def test_augmented_inference_maps_back_and_votes_the_true_answer(monkeypatch):
    """A stand-in for generation that applies the task's colour map to the prompt's query grid (in the
    transformed frame): every group's inverse-mapped prediction must be the true test output."""
    task = small_task(seed=4)
    mapping = np.arange(10)
    for grid_in, grid_out in task.demos:
        mapping[grid_in.ravel()] = grid_out.ravel()

    def oracle_generate(model, prompts, *, max_new_tokens, stop_tokens, pad_id):
        outputs = []
        for prompt in prompts:
            query = decode_grid(prompt[len(prompt) - 1 - prompt[::-1].index(IN) + 1: -1])
            outputs.append(answer_tokens(mapping[query]).tolist())
        return outputs

    class FakeModel:
        config = ModelConfig(max_seq_len=512)

    monkeypatch.setattr(ttt, "generate", oracle_generate)
    config = TTTConfig()
    prompts = inference_prompts(task, task.tests[0][0], config, 512)
    seen_groups = sorted({p.group for p in prompts})
    assert seen_groups == sorted(config.inference_transforms) and len(prompts) == 2 * len(seen_groups)
    groups = ttt.predict_groups(FakeModel(), prompts, config)
    for grids in groups.values():
        for grid in grids:
            np.testing.assert_array_equal(grid, task.tests[0][1])
    assert ttt.solve_task(FakeModel(), task, config) == {"hierarchical": 1.0, "flat": 1.0}
    wrong = ArcTask("wrong", task.demos, ((task.tests[0][0], task.tests[0][1] + 1),))
    assert ttt.solve_task(FakeModel(), wrong, config) == {"hierarchical": 0.0, "flat": 0.0}


def test_ttt_smoke_run_trains_a_fresh_adapter_per_task_on_cpu():
    model = DecoderLM(ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                                  mlp_dim=32, max_seq_len=128), rngs=nnx.Rngs(0))
    tasks = [small_task(seed=1, family="flip_lr")]
    config = TTTConfig(lora=LoraConfig(rank=2), steps=3, seq_len=96, max_items=6, max_new_tokens=16,
                       inference_transforms=("identity", "transpose"), demo_orders=1)
    outcomes = evaluate(model, tasks, config, mode="ttt")
    assert [o.name for o in outcomes] == ["flip_lr"]
    assert all(o.num_items == 6 and o.score in (0.0, 1.0) for o in outcomes)
    with pytest.raises(ConfigError, match="mode"):
        evaluate(model, tasks, config, mode="joint")
