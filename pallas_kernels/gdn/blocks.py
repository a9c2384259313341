"""Block sizes and launch parameters of the gated delta rule kernels, per backend (the one place they are chosen).

``chunk``: tokens per chunk of the WY/UT form; ``state_value_block``: value columns per program of the
sequential chunk-state pass (the state's K rows are coupled through ``W S``, so only V is split, and narrower
blocks mean more programs in flight); ``output_value_block``: value columns per program of the parallel
chunk-output pass (wider blocks recompute ``Q Kᵀ`` less often); ``sub_block``: rows of the diagonal blocks of
the UT transform (Triton's smallest matmul tile is 16); ``grad_value_block``: value columns per step of the
per-chunk gradient kernel's walk over the value dim (narrower: fewer live registers, more steps);
``transform_float32_dots`` / ``grad_float32_dots``: precision of the float32 products of the UT transform and of
the per-chunk gradient kernel (``float32_dots.py``: ``"ieee"`` or ``"tf32x3"``; interpreted kernels always
``"ieee"``). ``*_warps`` / ``state_stages``: Triton warps per program of each kernel and software-pipelining
stages of the sequential passes (GPU only). ``backward``: ``"kernels"`` (reverse state-cotangent kernel +
per-chunk gradient kernel), ``"chunk_vjp"`` (reverse state-cotangent kernel + the XLA VJP of ``chunk_local``) or
``"reference"`` (VJP of the XLA chunked form recomputed from the inputs). TPU tiles are multiples of 8 x 128, so
the value blocks are the whole value dim there.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.registry import UnsupportedShapeError, backend

SUB_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class GDNBlocks:
    """Block sizes and launch parameters of one gated delta rule kernel call (module docstring)."""

    chunk: int
    state_value_block: int
    output_value_block: int
    sub_block: int = SUB_BLOCK
    transform_warps: int = 4
    state_warps: int = 4
    state_stages: int = 3
    output_warps: int = 4
    grad_value_block: int | None = None  # None: the whole value dim
    grad_warps: int = 4
    transform_float32_dots: str = "ieee"
    grad_float32_dots: str = "tf32x3"
    backward: str = "kernels"


BACKWARDS = ("kernels", "chunk_vjp", "reference")


def gdn_blocks(key_dim: int, value_dim: int, chunk_size: int | None = None) -> GDNBlocks:
    """Block sizes for head dims ``key_dim``/``value_dim``; a clear error for dims the kernels do not tile."""
    for name, dim in (("key_dim", key_dim), ("value_dim", value_dim)):
        if dim % 16 or dim & (dim - 1):
            raise UnsupportedShapeError(f"gated_delta_rule pallas kernel: {name}={dim} must be a power of two and a "
                                        "multiple of 16 (use impl='chunked', or impl='auto' to fall back)")
    chunk = 64 if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < SUB_BLOCK or chunk & (chunk - 1):
        raise UnsupportedShapeError(f"gated_delta_rule pallas kernel: chunk_size={chunk} must be a power of two "
                                    f">= {SUB_BLOCK}")
    if backend() == "tpu":
        return GDNBlocks(chunk=chunk, state_value_block=value_dim, output_value_block=value_dim)
    # H100, 1 x 16K tokens, 16 heads of 128 (bf16): 16-column state blocks (more programs in flight) with 3
    # pipelining stages ran the sequential pass in 0.47 ms (32: 0.49, 64: 0.64; 1 stage: 0.72-0.92); one
    # 128-column output block 0.27 ms (64: 0.29); 4 warps beat 2 and 8 in every kernel. The per-chunk gradient
    # kernel's first form (five [C, K|C] float32 sums live at once, 64-column steps, 4 warps, IEEE float32
    # products) took fwd+bwd to 17.1 ms (XLA per-chunk VJP: 10.6); one kernel with TF32x3 products walking
    # 32 columns 6.6 ms alone on 4 warps (7.9 on 8). Split in two (kernel_chunk_bwd), the value half took
    # 3.0 / 1.8 / 1.6 ms with 32- / 64- / 128-column steps on 4 warps (3.9 ms on 8 warps at 32), the key half
    # 1.5 ms (4 or 8 warps).
    return GDNBlocks(chunk=chunk, state_value_block=min(value_dim, 16), output_value_block=min(value_dim, 128),
                     grad_value_block=min(value_dim, 128), grad_warps=4)
