"""Backend choice shared by every kernel family: compiled Pallas on GPU/TPU, interpret mode on CPU, and the
``impl="auto"`` rule of ``jaxlm.ops``."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax

Result = TypeVar("Result")


def interpret_mode() -> bool:
    """True on a CPU backend, where Pallas kernels run in interpret mode (how the CPU tests run them)."""
    return jax.default_backend() == "cpu"


def backend() -> str:
    """``"gpu"``, ``"tpu"`` or ``"cpu"``: the key of the per-backend block-size tables."""
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


class UnsupportedShapeError(ValueError):
    """A kernel was asked for a shape or dtype it does not handle; ``impl="auto"`` falls back to XLA."""


def kernels_unless_unsupported(kernels: Callable[[], Result], xla: Callable[[], Result]) -> Result:
    """``impl="auto"``: ``kernels()`` (the Pallas path) on a GPU, falling back to ``xla()`` (the XLA chunked or
    blockwise path) when the kernels raise ``UnsupportedShapeError`` for these inputs; ``xla()`` on every other
    backend (TPU and CPU: on CPU the kernels would only run in interpret mode)."""
    if backend() == "gpu":
        try:
            return kernels()
        except UnsupportedShapeError:
            pass
    return xla()
