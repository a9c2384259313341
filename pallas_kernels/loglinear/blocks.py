"""Block sizes of the log-linear SSD kernels, per backend (the one place they are chosen).

- ``chunk``: tokens per chunk. Fenwick levels ``0 … log2 C`` stay inside a chunk (a dense ``C x C`` block);
  the ``ceil(log2(T / C))`` chunk levels above them go through the level states.
- ``key_block`` / ``value_block``: state rows / columns per program of the sequential level-state pass. Every
  program keeps its tile of each carried level on chip, so the tile times the number of carried levels is
  what must fit in registers.
- ``cotangent_value_block``: value columns per program of the reverse level-cotangent pass (None:
  ``value_block``); it carries one more level than the forward pass.
- ``output_value_block``: value columns per program of the parallel chunk-output kernel.
- ``num_warps`` / ``state_num_warps`` / ``grad_num_warps``: Triton warps of the parallel chunk-output kernel /
  the two sequential passes / the per-chunk gradient kernel (None: the Pallas default). The gradient kernel
  takes 8 (H100, alone: 1.16 ms at 4 × 4096 and 1.13 ms at 1 × 16384, against 1.31 / 1.27 on 4).
- ``backward``: ``"kernels"`` (the Pallas backward kernels) or ``"reference"`` (the VJP of the XLA chunked
  form, recomputed from the inputs).

GPU (Triton; H100, B=1, T=16K, H=16, K=V=128, bf16): 64-token chunks and 32 x 64 level tiles (128 programs;
seven carried levels take 56 KiB per program): level states 0.46 ms, chunk outputs 0.36 ms, level-input
preparation 0.17 ms, forward 0.76 ms. The reverse level-cotangent pass carries eight levels, so it takes
32 x 32 tiles. The kernels use the time-major ``[B, T, X, D]`` layout (no transposes around them) and whole
level-state slabs per program (Triton pointer blocks); TPU is not a target.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.registry import UnsupportedShapeError, backend

DEFAULT_CHUNK = {"gpu": 64, "cpu": 64}  # tokens per chunk when the caller names none
BACKWARDS = ("kernels", "reference")


@dataclasses.dataclass(frozen=True)
class LogLinearBlocks:
    chunk: int
    key_block: int
    value_block: int
    output_value_block: int
    num_warps: int | None = None
    state_num_warps: int | None = None
    backward: str = "kernels"
    cotangent_value_block: int | None = None
    grad_num_warps: int | None = None


def loglinear_blocks(key_dim: int, value_dim: int, chunk_size: int | None = None,
                     platform: str | None = None) -> LogLinearBlocks:
    """Block sizes for head dims ``key_dim``/``value_dim`` on ``platform`` (default: the current backend);
    a clear error for dims or chunks the kernels do not tile."""
    for name, dim in (("key_dim", key_dim), ("value_dim", value_dim)):
        if dim % 16 or dim & (dim - 1):
            raise UnsupportedShapeError(f"loglinear_ssd pallas kernel: {name}={dim} must be a power of two and a "
                                        "multiple of 16 (use impl='chunked', or impl='auto' to fall back)")
    platform = platform or backend()
    chunk = DEFAULT_CHUNK.get(platform, 64) if chunk_size is None else chunk_size
    blocks = LogLinearBlocks(chunk=chunk, key_block=min(key_dim, 32), value_block=min(value_dim, 64),
                             output_value_block=min(value_dim, 128), num_warps=4, state_num_warps=4,
                             cotangent_value_block=min(value_dim, 32), grad_num_warps=8)
    check_blocks(blocks, key_dim, value_dim)
    return blocks


def check_blocks(blocks: LogLinearBlocks, key_dim: int, value_dim: int) -> None:
    """Raise ``UnsupportedShapeError`` when ``blocks`` does not tile the head dims or the chunk is not a power
    of two >= 16."""
    if blocks.chunk < 16 or blocks.chunk & (blocks.chunk - 1):
        raise UnsupportedShapeError(f"loglinear_ssd pallas kernel: chunk_size={blocks.chunk} must be a power of "
                                    "two >= 16")
    sizes = [("key_block", blocks.key_block, key_dim), ("value_block", blocks.value_block, value_dim),
             ("output_value_block", blocks.output_value_block, value_dim)]
    if blocks.cotangent_value_block is not None:
        sizes.append(("cotangent_value_block", blocks.cotangent_value_block, value_dim))
    for name, block, dim in sizes:
        if block < 16 or dim % block or block & (block - 1):
            raise UnsupportedShapeError(f"loglinear_ssd pallas kernel: {name}={block} must be a power of two >= 16 "
                                        f"dividing {dim}")
    if blocks.backward not in BACKWARDS:
        raise ValueError(f"loglinear_ssd pallas kernel: backward={blocks.backward!r} must be one of {BACKWARDS}")
