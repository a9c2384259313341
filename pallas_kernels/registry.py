"""Backend choice shared by every kernel family: compiled Pallas on GPU/TPU, interpret mode on CPU."""

from __future__ import annotations

import jax


def interpret_mode() -> bool:
    """True on a CPU backend, where Pallas kernels run in interpret mode (how the CPU tests run them)."""
    return jax.default_backend() == "cpu"


def backend() -> str:
    """``"gpu"``, ``"tpu"`` or ``"cpu"``: the key of the per-backend block-size tables."""
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


class UnsupportedShapeError(ValueError):
    """A kernel was asked for a shape or dtype it does not handle; ``impl="auto"`` falls back to XLA."""
