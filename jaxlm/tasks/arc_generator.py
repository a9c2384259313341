"""ARC-like generated tasks: a family is a composition of grid primitives; a task samples the family's
parameters (e.g. which colour map) once and applies it to random input grids.

Primitives (``PRIMITIVES``): ``flip_lr``, ``flip_ud``, ``rot90``, ``transpose``, ``colour_map`` (a fixed
permutation of colours 1..9), ``translate`` (shift by one cell down or right, zero fill), ``gravity``
(non-zero cells fall to the bottom of their column, keeping their order), ``fill`` (background cells take
one colour), ``tile`` (the grid twice side by side), ``mirror_copy`` (the grid then its left-right mirror).

A family ``"a+b"`` computes ``b(a(grid))``. ``family_split`` sets aside some two-primitive compositions as
held-out families: every primitive is seen in training, those combinations never are, so solving them takes
inferring a new rule from the demos (the test-time-training setting).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np

from jaxlm.errors import require
from jaxlm.tasks.arc import NUM_COLOURS, ArcTask, Grid
from jaxlm.tasks.arc_augment import grid_transform, random_colour_permutation


def _gravity(grid: Grid, _params) -> Grid:
    """Per column, zeros first then the non-zero cells in their original top-to-bottom order."""
    order = np.argsort(grid != 0, axis=0, kind="stable")  # [H, W]
    return np.take_along_axis(grid, order, axis=0)


def _translate(grid: Grid, axis: int) -> Grid:
    """Shift by one cell along ``axis`` (0: down, 1: right); the vacated line is background 0."""
    shifted = np.roll(grid, 1, axis=axis)
    index = [slice(None), slice(None)]
    index[axis] = 0
    shifted[tuple(index)] = 0
    return shifted


def _fill(grid: Grid, colour: int) -> Grid:
    return np.where(grid == 0, colour, grid)


@dataclasses.dataclass(frozen=True)
class Primitive:
    """``apply(grid, params)`` with ``params = sample_params(rng)`` drawn once per task."""

    name: str
    apply: Callable[[Grid, object], Grid]
    sample_params: Callable[[np.random.Generator], object] = lambda rng: None
    widens: bool = False  # output twice as wide as the input


def _geometric(name: str) -> Primitive:
    transform = grid_transform(name)
    return Primitive(name, lambda grid, _: transform.forward(grid))


PRIMITIVES = {p.name: p for p in [
    _geometric("flip_lr"), _geometric("flip_ud"), _geometric("rot90"), _geometric("transpose"),
    Primitive("colour_map", lambda grid, perm: perm[grid], random_colour_permutation),
    Primitive("translate", lambda grid, axis: _translate(grid, axis), lambda rng: int(rng.integers(2))),
    Primitive("gravity", _gravity),
    Primitive("fill", _fill, lambda rng: int(rng.integers(1, NUM_COLOURS))),
    Primitive("tile", lambda grid, _: np.concatenate([grid, grid], axis=1), widens=True),
    Primitive("mirror_copy", lambda grid, _: np.concatenate([grid, grid[:, ::-1]], axis=1), widens=True),
]}


def family_primitives(family: str) -> list[Primitive]:
    """The primitives of ``family`` (names joined by ``+``), in application order."""
    names = family.split("+")
    for name in names:
        require(name in PRIMITIVES, "family", family, f"primitive names from {tuple(PRIMITIVES)} joined by '+'")
    require(sum(PRIMITIVES[name].widens for name in names) <= 1, "family", family,
            "at most one widening primitive (tile, mirror_copy)")
    return [PRIMITIVES[name] for name in names]


def all_families() -> list[str]:
    """Every single primitive and every ordered pair of distinct primitives with at most one widening one."""
    names = list(PRIMITIVES)
    pairs = [f"{a}+{b}" for a, b in itertools.permutations(names, 2)
             if not (PRIMITIVES[a].widens and PRIMITIVES[b].widens)]
    return names + pairs


def family_split(num_held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train_families, held_out_families)``: ``num_held_out`` random two-primitive families held out.

    Single primitives always stay in training, so every held-out family composes seen primitives.
    """
    families = all_families()
    pairs = [family for family in families if "+" in family]
    require(0 < num_held_out < len(pairs), "num_held_out", num_held_out, f"an integer in [1, {len(pairs) - 1}]")
    rng = np.random.default_rng(seed)
    held_out = sorted(pairs[i] for i in rng.choice(len(pairs), num_held_out, replace=False))
    return [family for family in families if family not in held_out], held_out


def random_input_grid(rng: np.random.Generator, min_side: int, max_side: int, palette: np.ndarray) -> Grid:
    """A random ``[h, w]`` grid (sides in [min_side, max_side]): background 0, ~40% cells from ``palette``."""
    height, width = rng.integers(min_side, max_side + 1, size=2)
    cells = rng.choice(palette, size=(height, width))
    return np.where(rng.random((height, width)) < 0.4, cells, 0).astype(np.int32)


def generate_task(family: str, rng: np.random.Generator, *, num_demos: int = 3, num_tests: int = 1,
                  min_side: int = 3, max_side: int = 5) -> ArcTask:
    """A task of ``family``: parameters drawn once, then ``num_demos + num_tests`` random input grids mapped.

    A widening family halves the input width bound so outputs stay within ``max_side``·2 columns; each
    task draws a palette of 3 colours from 1..9 for its inputs.
    """
    require(num_demos >= 2, "num_demos", num_demos, "at least 2 (leave-one-out needs two demos)")
    require(1 <= min_side <= max_side, "max_side", max_side, f"an integer >= min_side={min_side} >= 1")
    primitives = family_primitives(family)
    params = [primitive.sample_params(rng) for primitive in primitives]
    palette = 1 + rng.choice(NUM_COLOURS - 1, size=3, replace=False)
    pairs = []
    for _ in range(num_demos + num_tests):
        grid = random_input_grid(rng, min_side, max_side, palette)
        output = grid
        for primitive, param in zip(primitives, params):
            output = primitive.apply(output, param)
        pairs.append((grid, np.ascontiguousarray(output, np.int32)))
    return ArcTask(name=family, demos=tuple(pairs[:num_demos]), tests=tuple(pairs[num_demos:]))
