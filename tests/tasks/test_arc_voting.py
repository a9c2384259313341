"""ARC voting on hand-made candidates: flat and hierarchical rules, majority fills, pass@2."""

import numpy as np

from jaxlm.tasks.arc_voting import (flat_vote, group_shortlist, hierarchical_vote, is_solved, majority_grid,
                                    ranked_by_votes, vote)

A, B, C, D = (np.full((2, 2), c) for c in (1, 2, 3, 4))


def keys(grids):
    return [int(g[0, 0]) for g in grids]


def test_ranked_by_votes_counts_and_breaks_ties_by_first_seen():
    ranked = ranked_by_votes([B, A, A, C, B, D])
    assert [(int(g[0, 0]), n) for g, n in ranked] == [(2, 2), (1, 2), (3, 1), (4, 1)]


def test_flat_and_hierarchical_votes_differ_on_a_crafted_case():
    # A has the most raw votes (all from one group); B and C each reach three groups' shortlists.
    groups = {"identity": [A, A, A, A, A, A, B], "transpose": [B, C], "flip_lr": [C, B], "rot90": [C, D]}
    assert keys(flat_vote(groups)) == [1, 2]  # A: 6 votes, then B and C with 3 each (B seen first)
    # shortlists: [A, B], [B, C], [C, B], [C, D] -> B and C on 3 lists, tie on votes, B listed first
    assert keys(hierarchical_vote(groups)) == [2, 3]
    assert keys(vote(groups, "flat", attempts=1)) == [1]


ROWS_1 = np.array([[1, 1], [2, 2], [4, 4]])
ROWS_2 = np.array([[1, 1], [3, 3], [5, 5]])
ROWS_3 = np.array([[6, 6], [3, 3], [4, 4]])


def test_majority_grids_take_the_most_common_row_or_column():
    # row i of the row-majority grid is the most common row i: a grid none of the candidates is
    np.testing.assert_array_equal(majority_grid([ROWS_1, ROWS_2, ROWS_3], axis=0), [[1, 1], [3, 3], [4, 4]])
    c1, c2, c3 = np.array([[1, 5], [1, 5]]), np.array([[1, 6], [1, 6]]), np.array([[2, 6], [2, 6]])
    np.testing.assert_array_equal(majority_grid([c1, c2, c3], axis=1), [[1, 6], [1, 6]])
    np.testing.assert_array_equal(majority_grid([c1, c3, c2], axis=0), [[1, 5], [1, 5]])  # all tied: first seen
    # only grids of the most common shape take part
    np.testing.assert_array_equal(majority_grid([c1, np.zeros((3, 3), int), c1], axis=0), c1)
    assert majority_grid([], axis=0) is None


def test_group_shortlist_fills_with_majority_grids_when_short():
    shortlist = group_shortlist([ROWS_1, ROWS_2, ROWS_3], per_group=5)
    # three distinct grids, plus the new row-majority grid; the column-majority grid is ROWS_1 (already in)
    assert len(shortlist) == 4
    np.testing.assert_array_equal(shortlist[3], [[1, 1], [3, 3], [4, 4]])
    assert len(group_shortlist([ROWS_1, ROWS_2, ROWS_3], per_group=2)) == 2


def test_is_solved_needs_exact_shape_and_cells():
    assert is_solved([A, B], B)
    assert not is_solved([A, np.full((2, 3), 2)], B)
