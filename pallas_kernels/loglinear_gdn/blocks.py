"""Block sizes of the log-linear Gated DeltaNet kernels, per backend (the one place they are chosen).

- ``chunk``: tokens per chunk of the WY/UT form. Fenwick levels ``0 … log2 C`` stay inside a chunk (a dense
  ``C x C`` block); the ``ceil(log2(T / C))`` chunk levels above them go through the level states.
- ``sub_block``: rows of the diagonal blocks of the UT transform (``pallas_kernels.gdn.kernel_ut``).
- ``state_value_block``: value columns per program of the sequential level-state pass. The state's K rows are
  coupled through ``W S``, so only V is split; every program keeps one ``K x state_value_block`` float32 tile
  per chunk level on chip.
- ``output_value_block``: value columns per program of the parallel chunk-output kernel.
- ``cotangent_value_block``: value columns per program of the reverse level-cotangent pass (``kernel_bwd``;
  None: ``state_value_block``). It keeps one ``K x cotangent_value_block`` float32 tile per chunk level on chip,
  as the forward pass does, and runs on ``state_warps``.
- ``transition_key_block``: rows of the chunk-transition cotangent ``P_n`` (``K x K``) summed at a time by
  ``kernel_bwd.transition_cotangents`` (None: all K rows).
- ``transform_warps`` / ``state_warps`` / ``output_warps``: Triton warps of each kernel (GPU only; the backward's
  parallel level kernels run on ``output_warps``).
- ``grad_warps`` / ``grad_float32_dots``: Triton warps of the per-chunk gradient kernel (``kernel_chunk_bwd``) and
  the precision of its float32 products (``pallas_kernels.gdn.float32_dots``: ``"ieee"`` or ``"tf32x3"``;
  interpreted kernels always ``"ieee"``). The level-read gradient kernel runs on ``output_value_block`` /
  ``output_warps``.
- ``backward``: ``"kernels"`` (the reverse level-cotangent kernel on the stored level states, the level-read and
  per-chunk gradient kernels: ``backward.py``), ``"chunk_vjp"`` (the per-chunk gradients from the XLA VJP of the
  per-chunk map instead) or ``"reference"`` (the VJP of the XLA chunked form recomputed from the inputs).

The GPU defaults follow the gated delta rule kernels (``pallas_kernels.gdn.blocks``). Backward, H100, B = 1,
T = 16K, H = 16, K = V = 128, bf16, each kernel alone: the reverse level-cotangent pass 5.5 ms on 16-column tiles
(8.9 ms on 32, 107 ms on 2 warps); ``P_n`` 0.88 / 1.34 / 1.99 ms with 64- / 32- / 16-row blocks; the level-read
gradients 0.54 / 0.65 / 0.89 ms with 128- / 64- / 32-column steps; the per-chunk gradients 7.5 ms on 4 warps
in four kernels (9.8 ms in three, 10.4 on 8 warps; as one kernel they asked for 256–336 KiB of shared memory
and did not run). TPU tiles are multiples of 8 x 128, so the value blocks are the whole value dim there.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.gdn.blocks import SUB_BLOCK
from pallas_kernels.gdn.float32_dots import FLOAT32_DOTS
from pallas_kernels.registry import UnsupportedShapeError, backend

DEFAULT_CHUNK = 64  # tokens per chunk when the caller names none
BACKWARDS = ("kernels", "chunk_vjp", "reference")


@dataclasses.dataclass(frozen=True)
class LogLinearGDNBlocks:
    """Block sizes and launch parameters of one log-linear Gated DeltaNet kernel call (module docstring)."""

    chunk: int
    state_value_block: int
    output_value_block: int
    sub_block: int = SUB_BLOCK
    transform_warps: int = 4
    state_warps: int = 4
    output_warps: int = 4
    cotangent_value_block: int | None = None  # None: state_value_block
    transition_key_block: int | None = None  # None: the whole key dim
    grad_warps: int = 4
    grad_float32_dots: str = "tf32x3"
    backward: str = "kernels"


def loglinear_gdn_blocks(key_dim: int, value_dim: int, chunk_size: int | None = None) -> LogLinearGDNBlocks:
    """Block sizes for head dims ``key_dim``/``value_dim`` on the current backend; a clear error for dims or
    chunks the kernels do not tile."""
    for name, dim in (("key_dim", key_dim), ("value_dim", value_dim)):
        if dim % 16 or dim & (dim - 1):
            raise UnsupportedShapeError(f"loglinear_gated_delta_rule pallas kernel: {name}={dim} must be a power of "
                                        "two and a multiple of 16 (use impl='chunked', or impl='auto' to fall back)")
    chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if backend() == "tpu":
        blocks = LogLinearGDNBlocks(chunk=chunk, state_value_block=value_dim, output_value_block=value_dim)
    else:
        blocks = LogLinearGDNBlocks(chunk=chunk, state_value_block=min(value_dim, 16),
                                    output_value_block=min(value_dim, 64), transition_key_block=min(key_dim, 64))
    check_blocks(blocks, key_dim, value_dim)
    return blocks


def check_blocks(blocks: LogLinearGDNBlocks, key_dim: int, value_dim: int) -> None:
    """Raise ``UnsupportedShapeError`` when the chunk is not a power of two >= the UT sub-block or a value (key)
    block does not tile ``value_dim`` (``key_dim``), ``ValueError`` for an unknown ``backward`` or
    ``grad_float32_dots``."""
    if blocks.backward not in BACKWARDS:
        raise ValueError(f"loglinear_gated_delta_rule pallas kernel: backward={blocks.backward!r} must be one of "
                         f"{BACKWARDS}")
    if blocks.grad_float32_dots not in FLOAT32_DOTS:
        raise ValueError(f"loglinear_gated_delta_rule pallas kernel: grad_float32_dots={blocks.grad_float32_dots!r} "
                         f"must be one of {FLOAT32_DOTS}")
    chunk = blocks.chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < blocks.sub_block or chunk & (chunk - 1):
        raise UnsupportedShapeError(f"loglinear_gated_delta_rule pallas kernel: chunk_size={chunk!r} must be a power "
                                    f"of two >= {blocks.sub_block}")
    for name in ("state_value_block", "output_value_block", "cotangent_value_block"):
        block = getattr(blocks, name) or blocks.state_value_block  # cotangent_value_block None: the state's
        if block < 16 or value_dim % block or block & (block - 1):
            raise UnsupportedShapeError(f"loglinear_gated_delta_rule pallas kernel: {name}={block} must be a power "
                                        f"of two >= 16 dividing value_dim={value_dim}")
    rows = blocks.transition_key_block or key_dim
    if rows < 16 or key_dim % rows or rows & (rows - 1):
        raise UnsupportedShapeError(f"loglinear_gated_delta_rule pallas kernel: transition_key_block={rows} must be "
                                    f"a power of two >= 16 dividing key_dim={key_dim}")
