"""Block sizes of the log-linear Gated DeltaNet kernels, per backend (the one place they are chosen).

- ``chunk``: tokens per chunk of the WY/UT form. Fenwick levels ``0 … log2 C`` stay inside a chunk (a dense
  ``C x C`` block); the ``ceil(log2(T / C))`` chunk levels above them go through the level states.
- ``sub_block``: rows of the diagonal blocks of the UT transform (``pallas_kernels.gdn.kernel_ut``).
- ``state_value_block``: value columns per program of the sequential level-state pass. The state's K rows are
  coupled through ``W S``, so only V is split; every program keeps one ``K x state_value_block`` float32 tile
  per chunk level on chip.
- ``output_value_block``: value columns per program of the parallel chunk-output kernel.
- ``transform_warps`` / ``state_warps`` / ``output_warps``: Triton warps of each kernel (GPU only).

The GPU defaults follow the gated delta rule kernels (``pallas_kernels.gdn.blocks``) and are untuned for the
level stack; TPU tiles are multiples of 8 x 128, so the value blocks are the whole value dim there.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.gdn.blocks import SUB_BLOCK
from pallas_kernels.registry import UnsupportedShapeError, backend

DEFAULT_CHUNK = 64  # tokens per chunk when the caller names none


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
                                    output_value_block=min(value_dim, 64))
    check_blocks(blocks, key_dim, value_dim)
    return blocks


def check_blocks(blocks: LogLinearGDNBlocks, key_dim: int, value_dim: int) -> None:
    """Raise ``UnsupportedShapeError`` when the chunk is not a power of two >= the UT sub-block or a value block
    does not tile ``value_dim``."""
    chunk = blocks.chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < blocks.sub_block or chunk & (chunk - 1):
        raise UnsupportedShapeError(f"loglinear_gated_delta_rule pallas kernel: chunk_size={chunk!r} must be a power "
                                    f"of two >= {blocks.sub_block}")
    for name in ("state_value_block", "output_value_block"):
        block = getattr(blocks, name)
        if block < 16 or value_dim % block or block & (block - 1):
            raise UnsupportedShapeError(f"loglinear_gated_delta_rule pallas kernel: {name}={block} must be a power "
                                        f"of two >= 16 dividing value_dim={value_dim}")
