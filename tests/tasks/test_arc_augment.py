"""ARC augmentations: every transform's inverse on all 800 ARC-1 tasks' grids, colour maps, task augmentation."""

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.tasks.arc import MAX_GRID_SIDE, load_arc_tasks
from jaxlm.tasks.arc_augment import (ALL_TRANSFORMS, augment_task, grid_transform, inverse_permutation,
                                     invert_grid, permute_colours, random_colour_permutation)


@pytest.fixture(scope="module")
def all_grids():
    tasks = load_arc_tasks("training") + load_arc_tasks("evaluation")
    return [grid for task in tasks for grid in task.grids()]


def test_every_transform_inverts_on_every_arc1_grid(all_grids):
    assert len(all_grids) > 5000
    for name in ALL_TRANSFORMS + ("rot90+flip_lr+transpose",):
        transform = grid_transform(name)
        for grid in all_grids:
            assert np.array_equal(transform.inverse(transform.forward(grid)), grid), (name, grid.shape)


def test_colour_permutation_fixes_zero_and_inverts_on_every_arc1_grid(all_grids):
    rng = np.random.default_rng(0)
    for grid in all_grids[::7]:
        permutation = random_colour_permutation(rng)
        assert permutation[0] == 0 and sorted(permutation) == list(range(10))
        mapped = permute_colours(grid, permutation)
        np.testing.assert_array_equal(mapped == 0, grid == 0)
        np.testing.assert_array_equal(invert_grid(mapped, grid_transform("identity"), permutation), grid)
        np.testing.assert_array_equal(permute_colours(mapped, inverse_permutation(permutation)), grid)


def test_transforms_match_hand_computed_results():
    grid = np.array([[1, 2, 3], [4, 5, 6]])
    expected = {
        "rot90": [[3, 6], [2, 5], [1, 4]],
        "flip_lr": [[3, 2, 1], [6, 5, 4]],
        "flip_ud": [[4, 5, 6], [1, 2, 3]],
        "transpose": [[1, 4], [2, 5], [3, 6]],
        "anti_transpose": [[6, 3], [5, 2], [4, 1]],
        "double_height": [[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]],
        "repeat_horizontal": [[1, 2, 3, 1, 2, 3], [4, 5, 6, 4, 5, 6]],
        "flip_lr+double_width": [[3, 3, 2, 2, 1, 1], [6, 6, 5, 5, 4, 4]],
    }
    for name, result in expected.items():
        np.testing.assert_array_equal(grid_transform(name).forward(grid), result, err_msg=name)
    assert grid_transform("upscale").forward(grid).shape == (4, 6)
    with pytest.raises(ConfigError, match="transform"):
        grid_transform("rot45")


def test_augment_task_applies_to_all_grids_reorders_demos_and_respects_size_limit():
    tasks = load_arc_tasks("evaluation")
    task = next(t for t in tasks if len(t.demos) >= 3)
    colours = random_colour_permutation(np.random.default_rng(1))
    order = list(range(len(task.demos)))[::-1]
    augmented = augment_task(task, grid_transform("transpose"), colours, order)
    for (new_in, new_out), (old_in, old_out) in zip(augmented.demos, task.demos[::-1]):
        np.testing.assert_array_equal(new_in, colours[old_in.T])
        np.testing.assert_array_equal(new_out, colours[old_out.T])
    np.testing.assert_array_equal(augmented.tests[0][0], colours[task.tests[0][0].T])
    big = next(t for t in tasks if max(max(g.shape) for g in t.grids()) > MAX_GRID_SIDE // 2)
    assert augment_task(big, grid_transform("upscale")) is None
    with pytest.raises(ConfigError, match="demo_order"):
        augment_task(task, grid_transform("identity"), demo_order=[0, 0, 1])
