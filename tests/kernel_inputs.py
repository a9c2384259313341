"""Random float64 inputs and packed-sequence segment ids shared by the linear-kernel tests (``pythonpath`` in
pyproject puts this folder on the import path)."""

from __future__ import annotations

import jax
import numpy as np


def gated_draws(rng: np.random.Generator, batch: int, length: int, groups: int, heads: int, key_dim: int,
                value_dim: int, max_log_decay: float) -> tuple:
    """``(q, k, v, log_a, beta)`` float64 drawn from ``rng`` in that order: unit-norm keys, ``−log_a`` in
    (0.01, ``max_log_decay``), β in (0.1, 0.95)."""
    q = rng.normal(size=(batch, length, groups, key_dim)) / np.sqrt(key_dim)
    k = rng.normal(size=(batch, length, groups, key_dim))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, length, heads, value_dim))
    log_a = -rng.uniform(0.01, max_log_decay, size=(batch, length, heads))
    beta = rng.uniform(0.1, 0.95, size=(batch, length, heads))
    return q, k, v, log_a, beta


def random_ssd_inputs(seed: int, batch: int, length: int, groups: int, heads: int, key_dim: int, value_dim: int,
                      with_cotangents: bool = False) -> tuple:
    """``(q, k, v, log_a, initial_state)`` float64 numpy for SSD (q and k scaled by ``1/√K``, ``−log_a`` in
    (0.01, 0.6)); ``with_cotangents``: also ``(d_out, d_final)`` drawn next from the same generator, returned as
    ``(inputs, cotangents)``."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, groups, key_dim)) / np.sqrt(key_dim)
    k = rng.normal(size=(batch, length, groups, key_dim)) / np.sqrt(key_dim)
    v = rng.normal(size=(batch, length, heads, value_dim))
    log_a = -rng.uniform(0.01, 0.6, size=(batch, length, heads))
    initial = rng.normal(size=(batch, heads, key_dim, value_dim))
    if not with_cotangents:
        return q, k, v, log_a, initial
    return (q, k, v, log_a, initial), (rng.normal(size=v.shape), rng.normal(size=initial.shape))


def jitted_outputs_and_vjp(op, arrays, cotangents):
    """``(op(*arrays), vjp(cotangents))`` under one ``jax.jit``, with float32 products (no TF32 on GPU)."""

    @jax.jit
    def run(arrays, cotangents):
        outputs, vjp = jax.vjp(op, *arrays)
        return outputs, vjp(cotangents)

    with jax.default_matmul_precision("float32"):
        return run(arrays, cotangents)


def random_gdn_inputs(seed: int, batch: int, length: int, groups: int, heads: int, key_dim: int = 16,
                      value_dim: int = 32, initial: str | None = "random") -> tuple:
    """``(q, k, v, log_a, beta, initial_state)`` float64 numpy for the gated delta rule (``gated_draws``, decays
    ``exp(log_a)`` in (0.5, 1)); ``initial`` ``"random"``, ``"zeros"`` or None (no state)."""
    rng = np.random.default_rng(seed)
    draws = gated_draws(rng, batch, length, groups, heads, key_dim, value_dim, max_log_decay=0.7)
    state_shape = (batch, heads, key_dim, value_dim)
    states = {"random": lambda: rng.normal(size=state_shape), "zeros": lambda: np.zeros(state_shape),
              None: lambda: None}
    if initial not in states:
        raise ValueError(f"initial={initial!r} must be 'random', 'zeros' or None")
    return (*draws, states[initial]())


def random_loglinear_gdn_inputs(seed: int, length: int, groups: int, heads: int, levels: int, key_dim: int,
                                value_dim: int, max_log_decay: float) -> tuple:
    """``(q, k, v, log_a, beta, lam)`` float64 numpy for one sequence (``gated_draws``), ``lam`` in (0.2, 1.8)
    with ``levels`` columns."""
    rng = np.random.default_rng(seed)
    draws = gated_draws(rng, 1, length, groups, heads, key_dim, value_dim, max_log_decay)
    return (*draws, rng.uniform(0.2, 1.8, size=(1, length, heads, levels)))


def packed_segment_ids(length: int = 45) -> np.ndarray:
    """Two rows of ids ``[2, length]`` for chunks of 16 (edges at 16 and 32). Row 0: starts at 5 (mid-chunk), 16 (on
    an edge), 20, 22, 23 (three in one chunk; 22 is a one-token segment) and 40; ids repeat non-adjacently. Row 1:
    starts at 32 (on an edge), 33 (a one-token segment at 32) and 44 (the last token alone)."""
    row0 = np.zeros(length, np.int32)
    for start, value in ((5, 3), (16, 7), (20, 3), (22, 9), (23, 1), (40, 7)):
        row0[start:] = value
    row1 = np.full(length, 2, np.int32)
    for start, value in ((32, 5), (33, 6), (44, 8)):
        row1[start:] = value
    return np.stack([row0, row1])[:, :length]
