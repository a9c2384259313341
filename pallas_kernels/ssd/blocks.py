"""Block sizes of the SSD kernels, per backend (the one place they are chosen).

- ``chunk``: tokens per chunk (the intra-chunk attention block of every kernel).
- ``key_block`` / ``value_block``: state rows / columns per program of the two sequential passes (chunk states
  forward, state cotangents backward). Rows and columns of the state are independent there, so smaller tiles
  multiply those passes' parallelism.
- ``output_value_block``: value columns per program of the forward chunk-output kernel.
- ``num_warps``: Triton warps of the parallel chunk kernels; ``state_num_warps`` / ``state_num_stages``: warps
  and load-pipelining depth of the two sequential passes (None: the Pallas defaults).
- ``time_major``: the kernels read and write ``[B, T, H, D]`` directly (no transposes around them; GPU), or
  head-major ``[B, H, T, D]`` copies whose blocks keep TPU's (8, 128) tiling (TPU).

GPU (Triton; H100 sweep at B=1, T=16K, H=16, K=V=128, bf16): 128-token chunks (half the stored states of
64 and half the sequential steps: forward 0.47 vs 0.57 ms), 32 x 64 state tiles (128 programs for one 16-head
sequence), whole-V output blocks and 8 warps for the chunk kernels; Triton's default load pipelining (3 stages)
in the sequential passes (1 or 2 stages: +40% / +25% there). TPU tiles are multiples of 8 x 128, so the blocks are the
whole head dims there. The backward per-chunk kernel always takes whole head dims (it sums over both).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.registry import UnsupportedShapeError, backend


DEFAULT_CHUNK = {"gpu": 128, "cpu": 64, "tpu": 64}  # tokens per chunk when the caller names none


@dataclasses.dataclass(frozen=True)
class SSDBlocks:
    chunk: int
    value_block: int
    key_block: int
    output_value_block: int
    num_warps: int | None = None
    state_num_warps: int | None = None
    state_num_stages: int | None = None
    time_major: bool = True


def ssd_blocks(key_dim: int, value_dim: int, chunk_size: int | None = None,
               platform: str | None = None) -> SSDBlocks:
    """Block sizes for head dims ``key_dim``/``value_dim`` on ``platform`` (default: the current backend);
    a clear error for dims the kernels do not tile."""
    for name, dim in (("key_dim", key_dim), ("value_dim", value_dim)):
        if dim % 16 or dim & (dim - 1):
            raise UnsupportedShapeError(f"ssd pallas kernel: {name}={dim} must be a power of two and a multiple "
                                        "of 16 (use impl='chunked', or impl='auto' to fall back automatically)")
    platform = platform or backend()
    chunk = DEFAULT_CHUNK.get(platform, 64) if chunk_size is None else chunk_size
    if chunk < 16 or chunk & (chunk - 1):
        raise UnsupportedShapeError(f"ssd pallas kernel: chunk_size={chunk} must be a power of two >= 16")
    if platform == "tpu":
        return SSDBlocks(chunk=chunk, value_block=value_dim, key_block=key_dim, output_value_block=value_dim,
                         time_major=False)
    wide = chunk >= 128
    return SSDBlocks(chunk=chunk, value_block=min(value_dim, 64), key_block=min(key_dim, 32),
                     output_value_block=min(value_dim, 128 if wide else 64), num_warps=8 if wide else 4)


def check_blocks(blocks: SSDBlocks, key_dim: int, value_dim: int) -> None:
    """Raise ``UnsupportedShapeError`` when a hand-picked ``blocks`` does not tile the head dims."""
    for name, block, dim in (("key_block", blocks.key_block, key_dim), ("value_block", blocks.value_block, value_dim),
                             ("output_value_block", blocks.output_value_block, value_dim)):
        if block < 16 or dim % block:
            raise UnsupportedShapeError(f"ssd pallas kernel: {name}={block} must be >= 16 and divide {dim}")
    if blocks.chunk < 16 or blocks.chunk & (blocks.chunk - 1):
        raise UnsupportedShapeError(f"ssd pallas kernel: chunk={blocks.chunk} must be a power of two >= 16")
