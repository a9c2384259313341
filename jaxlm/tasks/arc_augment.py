"""Invertible ARC augmentations (Akyürek et al. 2024, Sec. 3 and App. B): grid transforms, colour
permutations fixing colour 0, and demo order permutations.

A ``GridTransform`` maps a grid ``g`` to ``forward(g)`` and back with ``inverse(forward(g)) = g``:

- rotations ``rot90/180/270``, flips ``flip_lr``/``flip_ud``, reflections ``transpose`` (main diagonal)
  and ``anti_transpose`` (anti-diagonal);
- ``upscale`` (every cell becomes a 2×2 block: resolution doubling), ``double_height``/``double_width``
  (every row/column written twice), ``repeat_vertical``/``repeat_horizontal`` (the grid tiled twice);
- chains ``a+b`` (``forward = b ∘ a``, ``inverse = a⁻¹ ∘ b⁻¹``).

A transform applies to a task only when every transformed grid stays within ``MAX_GRID_SIDE`` (30).
A colour permutation ``π`` with ``π(0) = 0`` maps cell colours ``c → π(c)``; its inverse is ``argsort(π)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from jaxlm.errors import require
from jaxlm.tasks.arc import MAX_GRID_SIDE, NUM_COLOURS, ArcTask, Grid, Pair


@dataclasses.dataclass(frozen=True)
class GridTransform:
    """A named invertible grid map: ``inverse(forward(g)) == g`` for every grid ``g``."""

    name: str
    forward: Callable[[Grid], Grid]
    inverse: Callable[[Grid], Grid]


def _first_half(grid: Grid, axis: int) -> Grid:
    """The first half of ``grid`` along ``axis`` (inverse of tiling twice along it)."""
    return np.take(grid, np.arange(max(grid.shape[axis] // 2, 1)), axis=axis)


_BASE = {
    "identity": (lambda g: g, lambda g: g),
    "rot90": (lambda g: np.rot90(g, 1), lambda g: np.rot90(g, -1)),
    "rot180": (lambda g: np.rot90(g, 2), lambda g: np.rot90(g, -2)),
    "rot270": (lambda g: np.rot90(g, 3), lambda g: np.rot90(g, -3)),
    "flip_lr": (np.fliplr, np.fliplr),
    "flip_ud": (np.flipud, np.flipud),
    "transpose": (np.transpose, np.transpose),
    "anti_transpose": (lambda g: g[::-1, ::-1].T, lambda g: g[::-1, ::-1].T),
    "upscale": (lambda g: np.repeat(np.repeat(g, 2, axis=0), 2, axis=1), lambda g: g[::2, ::2]),
    "double_height": (lambda g: np.repeat(g, 2, axis=0), lambda g: g[::2]),
    "double_width": (lambda g: np.repeat(g, 2, axis=1), lambda g: g[:, ::2]),
    "repeat_vertical": (lambda g: np.concatenate([g, g], axis=0), lambda g: _first_half(g, 0)),
    "repeat_horizontal": (lambda g: np.concatenate([g, g], axis=1), lambda g: _first_half(g, 1)),
}
GEOMETRIC = ("identity", "rot90", "rot180", "rot270", "flip_lr", "flip_ud", "transpose", "anti_transpose")
RESIZING = ("upscale", "double_height", "double_width", "repeat_vertical", "repeat_horizontal")
CHAINS = ("rot90+upscale", "transpose+repeat_horizontal", "flip_lr+double_height", "rot180+repeat_vertical",
          "flip_ud+double_width")
ALL_TRANSFORMS = GEOMETRIC + RESIZING + CHAINS
# The transforms TTT inference prompts with (each its own voting group); see jaxlm.train.ttt.
INFERENCE_TRANSFORMS = ("identity", "transpose", "flip_lr", "flip_ud", "rot90", "rot180", "rot270")


def grid_transform(name: str) -> GridTransform:
    """The transform called ``name``: a base name of ``ALL_TRANSFORMS`` or a chain ``"a+b+…"`` of them."""
    parts = name.split("+")
    for part in parts:
        require(part in _BASE, "transform", name, f"base transforms {tuple(_BASE)} joined by '+'")
    forwards = [_BASE[part][0] for part in parts]
    inverses = [_BASE[part][1] for part in reversed(parts)]

    def forward(grid: Grid) -> Grid:
        for step in forwards:
            grid = step(grid)
        return np.ascontiguousarray(grid)

    def inverse(grid: Grid) -> Grid:
        for step in inverses:
            grid = step(grid)
        return np.ascontiguousarray(grid)

    return GridTransform(name, forward, inverse)


def random_colour_permutation(rng: np.random.Generator) -> np.ndarray:
    """``π [10]``: a uniform permutation of colours 1..9 with ``π[0] = 0`` (the background stays)."""
    return np.concatenate([[0], 1 + rng.permutation(NUM_COLOURS - 1)]).astype(np.int32)


def permute_colours(grid: Grid, permutation: np.ndarray) -> Grid:
    """Cell colours ``c → π[c]``."""
    return np.asarray(permutation)[grid]


def inverse_permutation(permutation: np.ndarray) -> np.ndarray:
    """``π⁻¹ = argsort(π)``, so ``π⁻¹[π[c]] = c``."""
    return np.argsort(permutation).astype(np.int32)


def transform_pairs(pairs: Sequence[Pair], transform: GridTransform, colours: np.ndarray | None = None,
                    max_side: int = MAX_GRID_SIDE) -> tuple[Pair, ...] | None:
    """Every grid of ``pairs`` through ``transform`` then the colour permutation ``colours`` (None: none);
    None if a transformed grid has a side above ``max_side``."""
    result = []
    for pair in pairs:
        new_pair = []
        for grid in pair:
            grid = transform.forward(grid)
            if max(grid.shape) > max_side:
                return None
            new_pair.append(grid if colours is None else permute_colours(grid, colours))
        result.append(tuple(new_pair))
    return tuple(result)


def invert_grid(grid: Grid, transform: GridTransform, colours: np.ndarray | None = None) -> Grid:
    """Undo ``transform_pairs`` on one (predicted) grid: the inverse colour map, then ``transform.inverse``."""
    if colours is not None:
        grid = permute_colours(grid, inverse_permutation(colours))
    return transform.inverse(grid)


def augment_task(task: ArcTask, transform: GridTransform, colours: np.ndarray | None = None,
                 demo_order: Sequence[int] | None = None, max_side: int = MAX_GRID_SIDE) -> ArcTask | None:
    """``task`` with all grids transformed (``transform_pairs``) and its demos reordered (``demo_order``,
    a permutation of their indices; None keeps the order); None when a grid would exceed ``max_side``."""
    demos = transform_pairs(task.demos, transform, colours, max_side)
    tests = transform_pairs(task.tests, transform, colours, max_side)
    if demos is None or tests is None:
        return None
    if demo_order is not None:
        require(sorted(demo_order) == list(range(len(demos))), "demo_order", list(demo_order),
                f"a permutation of range({len(demos)})")
        demos = tuple(demos[index] for index in demo_order)
    return ArcTask(name=f"{task.name}/{transform.name}", demos=demos, tests=tests)
