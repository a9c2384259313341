"""Word problems of the permutation groups A5 and S5 (state tracking; Merrill, Petty & Sabharwal 2024,
"The Illusion of State in State-Space Models", Sec. 4; Liu et al. 2023, "Transformers Learn Shortcuts to
Automata").

A word is a sequence of group elements ``g_1 … g_T`` drawn uniformly and independently; the target at
every position is the running product (the state after reading the prefix)

    p_t = p_{t-1} ∘ g_t,   p_0 = identity,   (a ∘ b)[i] = a[b[i]]

with permutations of ``{0, …, 4}`` in one-line notation (``a[i]`` is the image of ``i``). S5 is all 120
permutations, A5 the 60 even ones. A5 is the smallest non-solvable group: tracking its products is
NC¹-complete (Barrington 1989), so no fixed-depth transformer with fixed-precision attention can follow
arbitrarily long words.

Unlike the next-token tasks of ``jaxlm.tasks`` this is a labelled-sequence task: the model reads the
elements and is scored on the products at the same positions (the products are never inputs, so the model
cannot lean on the previous state). Elements and products share one vocabulary: the element with index
``e`` (lexicographic order of the one-line notation, identity first) is token ``FIRST_ELEMENT_ID + e``
whose symbol is its one-line notation, e.g. ``"10234"``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from jaxlm.errors import is_int, require
from jaxlm.tasks.symbols import SPECIAL_TOKENS, SymbolTokenizer

GROUPS = ("a5", "s5")
NUM_POINTS = 5  # both groups act on {0, 1, 2, 3, 4}
FIRST_ELEMENT_ID = len(SPECIAL_TOKENS)


def permutation_parity(permutation: tuple[int, ...]) -> int:
    """0 for an even permutation, 1 for an odd one: the parity of its number of inversions."""
    pairs = itertools.combinations(range(len(permutation)), 2)
    inversions = sum(1 for i, j in pairs if permutation[i] > permutation[j])
    return inversions % 2


def group_elements(group: str) -> np.ndarray:
    """The elements of ``group`` as one-line permutations ``[G, 5]`` int32, in lexicographic order.

    ``"s5"``: all 120 permutations of ``{0, …, 4}``; ``"a5"``: the 60 even ones. Row 0 is the identity.
    """
    require(group in GROUPS, "group", group, f"one of {GROUPS}")
    permutations = itertools.permutations(range(NUM_POINTS))
    if group == "a5":
        permutations = (p for p in permutations if permutation_parity(p) == 0)
    return np.array(list(permutations), dtype=np.int32)  # [G, 5]


def multiplication_table(elements: np.ndarray) -> np.ndarray:
    """``table[a, b]`` = index of ``elements[a] ∘ elements[b]`` with ``(x ∘ y)[i] = x[y[i]]``: ``[G, G]`` int32.

    Raises ValueError when the elements are not closed under composition (not a group).
    """
    index_of = {tuple(row): i for i, row in enumerate(elements.tolist())}
    composed = elements[:, elements]  # [G, G, 5]: composed[a, b] = elements[a][elements[b]]
    table = np.empty(composed.shape[:2], dtype=np.int32)  # [G, G]
    for a, b in np.ndindex(*table.shape):
        key = tuple(composed[a, b].tolist())
        if key not in index_of:
            raise ValueError(f"elements are not closed under composition: {elements[a]} ∘ {elements[b]} = {key}")
        table[a, b] = index_of[key]
    return table


@dataclasses.dataclass(frozen=True)
class PermutationTask:
    """Word problems of ``group`` ("a5" or "s5") with ``seq_len`` elements per word."""

    group: str
    seq_len: int

    def __post_init__(self):
        require(self.group in GROUPS, "group", self.group, f"one of {GROUPS}")
        require(is_int(self.seq_len) and self.seq_len > 0, "seq_len", self.seq_len, "a positive integer")

    @functools.cached_property
    def elements(self) -> np.ndarray:
        """``[G, 5]`` int32 one-line permutations (``group_elements``)."""
        return group_elements(self.group)

    @functools.cached_property
    def table(self) -> np.ndarray:
        """``[G, G]`` int32 multiplication table (``multiplication_table``)."""
        return multiplication_table(self.elements)

    @property
    def num_elements(self) -> int:
        return len(self.elements)

    @functools.cached_property
    def tokenizer(self) -> SymbolTokenizer:
        """Special tokens, then one symbol per element: its one-line notation (``"01234"`` is the identity)."""
        return SymbolTokenizer(["".join(map(str, row)) for row in self.elements.tolist()])

    def sample_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``batch_size`` words: ``(elements, products)`` token ids, each ``[batch_size, seq_len]`` int32.

        ``elements[:, t]`` are uniform group elements, ``products[:, t] = p_t`` their running products.
        """
        require(is_int(batch_size) and batch_size > 0, "batch_size", batch_size, "a positive integer")
        words = rng.integers(0, self.num_elements, size=(batch_size, self.seq_len), dtype=np.int32)  # [B, T]
        products = np.empty_like(words)  # [B, T]
        state = np.zeros(batch_size, dtype=np.int32)  # [B] index 0: the identity
        for t in range(self.seq_len):
            state = self.table[state, words[:, t]]
            products[:, t] = state
        return words + FIRST_ELEMENT_ID, products + FIRST_ELEMENT_ID

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One word: ``(elements [seq_len], products [seq_len])`` int32 token ids."""
        elements, products = self.sample_batch(rng, 1)
        return elements[0], products[0]

    def running_products(self, element_ids: np.ndarray) -> np.ndarray:
        """Exact check: the running products of a word ``[T]`` of element ids, composed permutation by
        permutation (independent of the multiplication table); returns ``[T]`` int32 token ids."""
        element_ids = np.asarray(element_ids)
        indices = element_ids - FIRST_ELEMENT_ID  # [T]
        if element_ids.ndim != 1 or indices.size and not (0 <= indices.min() and indices.max() < self.num_elements):
            raise ValueError(f"a word is a 1-D array of element ids in [{FIRST_ELEMENT_ID}, "
                             f"{FIRST_ELEMENT_ID + self.num_elements}); got {element_ids!r}")
        index_of = {tuple(row): i for i, row in enumerate(self.elements.tolist())}
        state = np.arange(NUM_POINTS)  # the identity
        products = []
        for index in indices.tolist():
            state = state[self.elements[index]]  # (state ∘ g)[i] = state[g[i]]
            products.append(index_of[tuple(state.tolist())] + FIRST_ELEMENT_ID)
        return np.array(products, dtype=np.int32)
