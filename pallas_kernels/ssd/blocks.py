"""Block sizes of the SSD kernels, per backend (the one place they are chosen).

``chunk``: tokens per chunk (the intra-chunk attention block); ``value_block`` / ``key_block``: value columns
per program, and state rows per program of the sequential chunk-state pass (its rows are independent, so
splitting K multiplies that pass's parallelism). GPU (Triton): 64-token chunks and 64 x 64 state tiles.
TPU tiles are multiples of 8 x 128, so the blocks are the whole head dims there.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.registry import UnsupportedShapeError, backend


@dataclasses.dataclass(frozen=True)
class SSDBlocks:
    chunk: int
    value_block: int
    key_block: int


def ssd_blocks(key_dim: int, value_dim: int, chunk_size: int | None = None) -> SSDBlocks:
    """Block sizes for head dims ``key_dim``/``value_dim``; a clear error for dims the kernels do not tile."""
    for name, dim in (("key_dim", key_dim), ("value_dim", value_dim)):
        if dim % 16 or dim & (dim - 1):
            raise UnsupportedShapeError(f"ssd pallas kernel: {name}={dim} must be a power of two and a multiple "
                                        "of 16 (use impl='chunked', or impl='auto' to fall back automatically)")
    chunk = 64 if chunk_size is None else chunk_size
    if chunk < 16 or chunk & (chunk - 1):
        raise UnsupportedShapeError(f"ssd pallas kernel: chunk_size={chunk} must be a power of two >= 16")
    if backend() == "tpu":
        return SSDBlocks(chunk=chunk, value_block=value_dim, key_block=key_dim)
    return SSDBlocks(chunk=chunk, value_block=min(value_dim, 64), key_block=min(key_dim, 64))
