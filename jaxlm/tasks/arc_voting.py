"""Choosing two ARC attempts from many augmented predictions (Akyürek et al. 2024, Sec. 5.2).

Predictions come in groups, one per inference transform (each group holds the inverse-mapped grids of that
transform's prompts). Two rules pick ``attempts`` (2 for pass@2) grids:

- flat: count every prediction once over all groups; the ``attempts`` most frequent grids win.
- hierarchical: in each group keep its ``per_group`` (3) most frequent grids, filling a short list with the
  group's row-majority and column-majority grids; then the grids on the most group lists win (ties: more
  predictions overall, then first seen).

Ties are always broken by first appearance (groups in their given order), so the result is deterministic.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from jaxlm.errors import require
from jaxlm.tasks.arc import Grid

GridKey = tuple


def grid_key(grid: Grid) -> GridKey:
    """A hashable key equal for grids with the same shape and cells."""
    grid = np.asarray(grid)
    return (grid.shape, tuple(int(v) for v in grid.ravel()))


def _key_to_grid(key: GridKey) -> Grid:
    shape, cells = key
    return np.asarray(cells, np.int32).reshape(shape)


def ranked_by_votes(grids: Sequence[Grid]) -> list[tuple[Grid, int]]:
    """Distinct grids with their counts, most frequent first (ties: first seen first)."""
    counts = Counter(grid_key(grid) for grid in grids)
    first_seen = list(dict.fromkeys(grid_key(grid) for grid in grids))
    ordered = sorted(first_seen, key=lambda key: (-counts[key], first_seen.index(key)))
    return [(_key_to_grid(key), counts[key]) for key in ordered]


def majority_grid(grids: Sequence[Grid], axis: int) -> Grid | None:
    """Among the grids of the most common shape, line ``i`` (a row for axis 0, a column for axis 1) is the
    most common line ``i`` of those grids (ties: first seen). None for no grids."""
    if not grids:
        return None
    shape = Counter(np.asarray(g).shape for g in grids).most_common(1)[0][0]
    same_shape = [np.asarray(g) for g in grids if np.asarray(g).shape == shape]
    lines = []
    for index in range(shape[axis]):
        candidates = [tuple(np.take(g, index, axis=axis).tolist()) for g in same_shape]
        lines.append(Counter(candidates).most_common(1)[0][0])
    grid = np.asarray(lines, np.int32)  # [lines, length]
    return grid if axis == 0 else grid.T


def flat_vote(groups: Mapping[str, Sequence[Grid]], attempts: int = 2) -> list[Grid]:
    """The ``attempts`` most frequent grids over all predictions of all groups."""
    require(attempts > 0, "attempts", attempts, "a positive integer")
    pooled = [grid for grids in groups.values() for grid in grids]
    return [grid for grid, _ in ranked_by_votes(pooled)[:attempts]]


def group_shortlist(grids: Sequence[Grid], per_group: int = 3) -> list[Grid]:
    """A group's ``per_group`` most frequent grids, filled (when short) by its row- then column-majority grid."""
    shortlist = [grid for grid, _ in ranked_by_votes(grids)[:per_group]]
    for axis in (0, 1):
        if len(shortlist) >= per_group:
            break
        majority = majority_grid(grids, axis)
        if majority is not None and grid_key(majority) not in {grid_key(g) for g in shortlist}:
            shortlist.append(majority)
    return shortlist


def hierarchical_vote(groups: Mapping[str, Sequence[Grid]], attempts: int = 2, per_group: int = 3) -> list[Grid]:
    """The ``attempts`` grids on the most group shortlists (``group_shortlist``), ties by total votes."""
    require(attempts > 0, "attempts", attempts, "a positive integer")
    require(per_group > 0, "per_group", per_group, "a positive integer")
    total_votes = Counter(grid_key(grid) for grids in groups.values() for grid in grids)
    listed = [grid for grids in groups.values() if grids for grid in group_shortlist(grids, per_group)]
    order = list(dict.fromkeys(grid_key(grid) for grid in listed))
    group_votes = Counter(grid_key(grid) for grid in listed)
    ranked = sorted(order, key=lambda key: (-group_votes[key], -total_votes[key], order.index(key)))
    return [_key_to_grid(key) for key in ranked[:attempts]]


def vote(groups: Mapping[str, Sequence[Grid]], method: str = "hierarchical", attempts: int = 2) -> list[Grid]:
    """``hierarchical_vote`` or ``flat_vote`` by name."""
    require(method in ("hierarchical", "flat"), "voting", method, "'hierarchical' or 'flat'")
    return hierarchical_vote(groups, attempts) if method == "hierarchical" else flat_vote(groups, attempts)


def is_solved(attempts: Sequence[Grid], target: Grid) -> bool:
    """pass@len(attempts): some attempt equals ``target`` exactly (shape and cells)."""
    return any(grid_key(attempt) == grid_key(target) for attempt in attempts)
