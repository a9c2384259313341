"""Teaching dialogues: rendering, loss masks, Bayesian vs oracle turns, and reading the model's picks."""

import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.tasks.flights import FLIGHTS, HOTELS, bayesian_recommendations, user_choices
from jaxlm.tasks.flights_dialogue import (DIALOGUE_TOKENIZER, OPTION_NAMES, heldout_recommendations,
                                          interactive_recommendations, model_choices, recommendation_positions,
                                          render_dialogues, round_length, sample_dialogues, teaching_batches,
                                          teaching_examples)


@pytest.fixture(scope="module")
def dialogues():
    return sample_dialogues(FLIGHTS, 24, seed=3)


@pytest.fixture(scope="module")
def tiny_model():
    config = ModelConfig(vocab_size=DIALOGUE_TOKENIZER.vocab_size, d_model=16, num_layers=1, num_heads=2,
                         num_kv_heads=2, mlp_dim=32, max_seq_len=256)
    return DecoderLM(config, rngs=nnx.Rngs(0))


def test_render_one_round_by_hand():
    levels = np.array([[[[0, 10, 2, 5], [10, 0, 1, 1], [3, 3, 0, 10]]]])  # [1, 1, 3, 4]
    tokens, learn = render_dialogues(FLIGHTS, levels, np.array([[2]]), np.array([[0]]))
    assert DIALOGUE_TOKENIZER.decode(tokens[0]) == (
        "| A v0 v20 v20 v10 B v20 v0 v10 v2 C v6 v6 v0 v20 > C = A")
    assert tokens[0, 0] == DIALOGUE_TOKENIZER.bos_id and tokens.shape == (1, 1 + round_length(4)) == (1, 21)
    np.testing.assert_array_equal(np.nonzero(learn[0])[0], [18])
    assert tokens[0, 18] == DIALOGUE_TOKENIZER.id_of("C")


def test_dialogue_fields_agree_with_the_task(dialogues):
    assert dialogues.levels.shape == (24, 5, 3, 4)
    np.testing.assert_array_equal(dialogues.choices, user_choices(FLIGHTS, dialogues.users, dialogues.levels))
    np.testing.assert_array_equal(dialogues.recommendations,
                                  bayesian_recommendations(FLIGHTS, dialogues.levels, dialogues.choices, dialogues.levels))
    # The assistant is sometimes wrong in round 1 (it knows nothing yet), so the two teachings differ.
    assert np.any(dialogues.recommendations != dialogues.choices)


def test_bayesian_and_oracle_teaching_differ_only_in_the_learned_turns(dialogues):
    bayesian, oracle = teaching_examples(dialogues, "bayesian"), teaching_examples(dialogues, "oracle")
    positions = recommendation_positions(5, 4)
    option_a = DIALOGUE_TOKENIZER.id_of("A")
    for n, ((b_tokens, b_learn), (o_tokens, o_learn)) in enumerate(zip(bayesian, oracle)):
        np.testing.assert_array_equal(b_learn, o_learn)
        np.testing.assert_array_equal(np.nonzero(b_learn)[0], positions)
        np.testing.assert_array_equal(np.delete(b_tokens, positions), np.delete(o_tokens, positions))
        np.testing.assert_array_equal(b_tokens[positions], option_a + dialogues.recommendations[n])
        np.testing.assert_array_equal(o_tokens[positions], option_a + dialogues.choices[n])
        np.testing.assert_array_equal(o_tokens[positions + 2], option_a + dialogues.choices[n])  # Y after "="
        assert all(DIALOGUE_TOKENIZER.decode([t]) == ">" for t in b_tokens[positions - 1])


def test_teaching_batches_score_exactly_the_recommendations(dialogues):
    examples = teaching_examples(dialogues, "bayesian")
    batches = teaching_batches(examples, batch_size=16, seed=0)
    seen = []
    for _ in range(3):  # 48 rows over 24 examples: every example twice
        batch = next(batches)
        assert batch["tokens"].shape == (16, 100)
        np.testing.assert_array_equal(batch["loss_mask"].sum(1), np.full(16, 5))
        scored = batch["targets"][batch["loss_mask"] > 0].reshape(16, 5)
        assert set(np.unique(scored)) <= set(DIALOGUE_TOKENIZER.ids_of(OPTION_NAMES))
        seen.append(batch["tokens"])
    rows = np.concatenate(seen)  # [48, 100]; each epoch is a permutation of all 24 examples
    for epoch in (rows[:24], rows[24:]):
        assert {row.tobytes() for row in epoch} == {tokens[:-1].tobytes() for tokens, _ in examples}


def test_model_choices_read_the_logits_before_each_position(dialogues, tiny_model):
    tokens, _ = render_dialogues(FLIGHTS, dialogues.levels, dialogues.recommendations, dialogues.choices)
    positions = recommendation_positions(5, 4)
    logits = np.asarray(tiny_model(tokens))  # [N, L, V] unpadded, one call
    expected = logits[:, positions - 1][..., DIALOGUE_TOKENIZER.ids_of(OPTION_NAMES)].argmax(-1)
    np.testing.assert_array_equal(model_choices(tiny_model, tokens, positions), expected)


def test_interactive_and_heldout_recommendations_are_self_consistent(dialogues, tiny_model):
    picks = interactive_recommendations(tiny_model, dialogues)  # [N, 5]
    tokens, _ = render_dialogues(FLIGHTS, dialogues.levels, picks, dialogues.choices)
    # With its own picks in the transcript, one causal pass reproduces every round's pick.
    np.testing.assert_array_equal(model_choices(tiny_model, tokens, recommendation_positions(5, 4)), picks)
    # A held-out query equal to round r of the dialogue is that round's pick.
    heldout = heldout_recommendations(tiny_model, dialogues, picks, dialogues.levels)
    np.testing.assert_array_equal(heldout, picks)


def test_other_tasks_render_with_their_own_feature_count():
    hotels = sample_dialogues(HOTELS, 8, seed=0, rounds=2)
    tokens, learn = render_dialogues(HOTELS, hotels.levels, hotels.recommendations, hotels.choices)
    assert tokens.shape == (8, 1 + 2 * round_length(4))
    values = {DIALOGUE_TOKENIZER.decode([t]) for t in tokens[:, 1:].reshape(-1)}
    assert values <= {"|", ">", "=", "A", "B", "C"} | {f"v{i}" for i in range(21)}
    assert learn.sum() == 16


@pytest.mark.parametrize("make, match", [
    (lambda d: teaching_examples(d, "teacher"), "bayesian"),
    (lambda d: render_dialogues(FLIGHTS, d.levels, d.choices[:, :2], d.choices), "option indices"),
    (lambda d: sample_dialogues(FLIGHTS, 0, seed=0), "positive"),
])
def test_bad_input_names_the_field(dialogues, make, match):
    with pytest.raises(ConfigError, match=match):
        make(dialogues)
