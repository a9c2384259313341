"""Float32 x float32 products of the gated delta rule kernels (the UT inverse and its gradient), at a chosen
precision: ``"ieee"`` (``Precision.HIGHEST``: IEEE float32 multiply-adds, no tensor cores on GPU) or ``"tf32x3"``
(``DotAlgorithmPreset.TF32_TF32_F32_X3``: each operand split into a TF32 head and tail, three TF32 tensor-core
products, about float32 accuracy). Interpreted kernels (CPU) always take ``"ieee"``: XLA on CPU has no TF32."""

from __future__ import annotations

import jax

from pallas_kernels.registry import backend, interpret_mode

FLOAT32_DOTS = ("ieee", "tf32x3")


def float32_precision(name: str, interpret=None):
    """The ``dot_general`` precision for ``name`` (one of ``FLOAT32_DOTS``) in a kernel launched with
    ``interpret`` (None: interpret on a CPU backend)."""
    if name not in FLOAT32_DOTS:
        raise ValueError(f"pallas kernel: float32_dots={name!r} must be one of {FLOAT32_DOTS}")
    interpret = interpret_mode() if interpret is None else interpret
    if name == "ieee" or interpret or backend() != "gpu":
        return jax.lax.Precision.HIGHEST
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
