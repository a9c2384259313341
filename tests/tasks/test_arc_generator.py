"""Generated ARC-like tasks: primitives on hand-made grids, family composition, the held-out split."""

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.tasks.arc_generator import PRIMITIVES, all_families, family_split, generate_task


def test_primitives_match_hand_computed_results():
    grid = np.array([[3, 0, 0], [0, 5, 0], [0, 0, 0]])
    np.testing.assert_array_equal(PRIMITIVES["gravity"].apply(grid, None), [[0, 0, 0], [0, 0, 0], [3, 5, 0]])
    np.testing.assert_array_equal(PRIMITIVES["translate"].apply(grid, 1), [[0, 3, 0], [0, 0, 5], [0, 0, 0]])
    np.testing.assert_array_equal(PRIMITIVES["translate"].apply(grid, 0), [[0, 0, 0], [3, 0, 0], [0, 5, 0]])
    np.testing.assert_array_equal(PRIMITIVES["fill"].apply(grid, 7), [[3, 7, 7], [7, 5, 7], [7, 7, 7]])
    np.testing.assert_array_equal(PRIMITIVES["mirror_copy"].apply(grid[:1], None), [[3, 0, 0, 0, 0, 3]])
    np.testing.assert_array_equal(PRIMITIVES["tile"].apply(grid[:1], None), [[3, 0, 0, 3, 0, 0]])
    stacked = np.array([[4, 0], [0, 0], [6, 0]])
    np.testing.assert_array_equal(PRIMITIVES["gravity"].apply(stacked, None), [[0, 0], [4, 0], [6, 0]])


def test_generated_task_applies_the_composition_with_one_parameter_draw():
    rng = np.random.default_rng(0)
    task = generate_task("colour_map+flip_lr", rng, num_demos=4, num_tests=2)
    assert len(task.demos) == 4 and len(task.tests) == 2
    # the colour map is the same in every pair: recover it from the first pair and check all others
    mapping = {}
    for grid_in, grid_out in task.demos + task.tests:
        unflipped = grid_out[:, ::-1]
        assert unflipped.shape == grid_in.shape
        for a, b in zip(grid_in.ravel(), unflipped.ravel()):
            assert mapping.setdefault(int(a), int(b)) == int(b)
    assert mapping.get(0, 0) == 0


def test_family_split_holds_out_unseen_pairs_of_seen_primitives():
    train, held_out = family_split(8, seed=3)
    assert len(held_out) == 8 and not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(all_families())
    for family in held_out:
        assert "+" in family and all(name in train for name in family.split("+"))
    assert "tile+mirror_copy" not in all_families()
    with pytest.raises(ConfigError, match="family"):
        generate_task("flip_lr+spin", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="num_demos"):
        generate_task("flip_lr", np.random.default_rng(0), num_demos=1)
