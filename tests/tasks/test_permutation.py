"""A5 / S5 word problems: the groups, the multiplication table and the running products, against brute force."""

import itertools

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.tasks.permutation import FIRST_ELEMENT_ID, PermutationTask, group_elements, multiplication_table


def brute_force_parity(permutation) -> int:
    """Parity from the cycle decomposition: a cycle of length c contributes c - 1 transpositions."""
    seen, transpositions = set(), 0
    for start in range(len(permutation)):
        length, point = 0, start
        while point not in seen:
            seen.add(point)
            point = permutation[point]
            length += 1
        transpositions += max(length - 1, 0)
    return transpositions % 2


@pytest.mark.parametrize("group, size", [("a5", 60), ("s5", 120)])
def test_groups_are_the_even_or_all_permutations(group, size):
    elements = group_elements(group)
    assert elements.shape == (size, 5)
    assert len({tuple(row) for row in elements.tolist()}) == size
    np.testing.assert_array_equal(elements[0], np.arange(5))  # the identity comes first
    all_permutations = set(itertools.permutations(range(5)))
    expected = {p for p in all_permutations if group == "s5" or brute_force_parity(p) == 0}
    assert {tuple(row) for row in elements.tolist()} == expected


def test_multiplication_table_composes_one_line_permutations():
    elements = group_elements("a5")
    table = multiplication_table(elements)
    rng = np.random.default_rng(0)
    for a, b in rng.integers(0, 60, size=(50, 2)):
        composed = [elements[a][elements[b][i]] for i in range(5)]  # (a ∘ b)[i] = a[b[i]]
        np.testing.assert_array_equal(elements[table[a, b]], composed)
    # Group axioms: identity row/column, every row a permutation (unique inverses), A5 non-abelian.
    np.testing.assert_array_equal(table[0], np.arange(60))
    np.testing.assert_array_equal(table[:, 0], np.arange(60))
    assert all(len(set(row)) == 60 for row in table.tolist())
    assert (table != table.T).any()


def test_multiplication_table_rejects_a_set_that_is_not_closed():
    not_a_group = np.array([[0, 1, 2, 3, 4], [1, 2, 0, 3, 4]], dtype=np.int32)  # a 3-cycle without its square
    with pytest.raises(ValueError, match="not closed"):
        multiplication_table(not_a_group)


@pytest.mark.parametrize("group", ["a5", "s5"])
def test_sampled_products_match_composition_step_by_step(group):
    task = PermutationTask(group, seq_len=13)
    words, products = task.sample_batch(np.random.default_rng(3), 7)
    assert words.shape == products.shape == (7, 13) and words.dtype == np.int32
    assert words.min() >= FIRST_ELEMENT_ID and words.max() < FIRST_ELEMENT_ID + task.num_elements
    np.testing.assert_array_equal(products[:, 0], words[:, 0])  # p_1 = g_1
    for word, product in zip(words, products):
        np.testing.assert_array_equal(task.running_products(word), product)
        state = np.arange(5)  # brute force on the permutations themselves
        for g, p in zip(word, product):
            state = np.array([state[task.elements[g - FIRST_ELEMENT_ID][i]] for i in range(5)])
            np.testing.assert_array_equal(task.elements[p - FIRST_ELEMENT_ID], state)


def test_hand_computed_word_and_symbols():
    task = PermutationTask("s5", seq_len=3)
    swap01, cycle012 = task.tokenizer.id_of("10234"), task.tokenizer.id_of("12034")
    # p1 = 10234; p2 = p1 ∘ 12034 = [p1[1], p1[2], p1[0], 3, 4] = 02134; p3 = p2 ∘ 10234 = 20134.
    products = task.running_products(np.array([swap01, cycle012, swap01]))
    assert task.tokenizer.decode(products) == "10234 02134 20134"
    assert task.tokenizer.vocab_size == FIRST_ELEMENT_ID + 120


def test_sampling_is_seeded():
    task = PermutationTask("a5", seq_len=9)
    first = task.sample_batch(np.random.default_rng([4, 1]), 5)
    again = task.sample_batch(np.random.default_rng([4, 1]), 5)
    other = task.sample_batch(np.random.default_rng([5, 1]), 5)
    np.testing.assert_array_equal(first[0], again[0])
    assert (first[0] != other[0]).any()
    word, product = task.sample(np.random.default_rng(0))
    assert word.shape == product.shape == (9,)


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="'group'.*one of"):
        PermutationTask("a4", seq_len=4)
    with pytest.raises(ConfigError, match="'seq_len'"):
        PermutationTask("a5", seq_len=0)
    with pytest.raises(ConfigError, match="'batch_size'"):
        PermutationTask("a5", seq_len=4).sample_batch(np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="element ids"):
        PermutationTask("a5", seq_len=4).running_products(np.array([0, 3]))
