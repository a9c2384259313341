"""Block sizes and supported shapes of the PaTH kernels, per backend (the one place they are chosen).

``block``: tokens per block, both the query block of one program and the key block of one loop step (the
UT transform, block products and intra-block logits are per block of this size). GPU (Triton) loads need
power-of-two tiles of at least 16, so the head dim and the block are powers of two ≥ 16; TPU tiles are
multiples of 8 x 128 in their last two dims, which the kernels meet with whole-head-dim and whole-block
tiles. ``num_warps`` / ``num_stages``: Triton settings (None: Pallas' defaults); every head dim takes one
pipeline stage on GPU (shared memory at D = 128, speed at D = 64), head dims above 128 are refused there.
``backward``: ``"kernels"`` (the Pallas backward of ``kernel_bwd``) or ``"xla"`` (the linear-memory XLA backward of
``jaxlm.ops.path_blockwise_vjp``, the reference); ``superblock``: key blocks per super-block of the query-side
backward's recomputation (None: ``default_superblock``); ``forward_superblock``: key blocks per
super-block of the forward kernel, whose query crosses a whole super-block in one move (``kernel_fwd``; None:
``default_superblock``, ⌈√N⌉ for N blocks; on an H100 the kernel alone took 20.3 / 21.5 ms with 8 / 16 blocks at
32 × 4096 × 32 × 64, N = 64, and 49.9 / 42.7 ms at 4 × 16384 × 16 × 128, N = 256). ``preprocess``: where the
per-block terms (𝒯, carried keys, block products) are computed, ``"kernel"`` (``kernel_prep``, inverse blocks of
``prep_sub_block`` tokens, the triangular system's products at ``float32_dots``; on an H100 at 32 × 4096 × 32 × 64
8.9 ms with 32-token sub-blocks and TF32×3, against 21.8 ms for XLA's and 22–26 ms with full-float32 products)
or ``"xla"`` (``jaxlm.ops.path_blockwise``). ``terms_backward``: how the Pallas backward rebuilds and pulls back
the block terms, ``"kernel"`` (``kernel_prep.path_query_terms`` and ``kernel_terms_bwd``, whose products through
the UT inverse also take ``float32_dots``) or ``"xla"`` (``jax.vjp`` of ``jaxlm.ops.path_blockwise.blockwise_terms``).
``save_block_terms``: the forward keeps its per-KV-head 𝒯, k̄ and P for the kernels' backward instead of the
backward building them again (``terms_backward == "kernel"`` only). It saves the preprocessing's time in the
backward (10.3 ms of 120.6 at 32 × 4096 × 32 × 64 on an H100) for ``G·T'·(C + D)`` float32 values and ``G·T'·D``
in k's dtype per batch row, per layer (2.4 GB at that shape, next to 1.6 GB for the other residuals).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels.registry import UnsupportedShapeError, backend

DEFAULT_BLOCK = {"gpu": 64, "tpu": 128, "cpu": 64}
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
BACKWARDS = ("kernels", "xla")
PREPROCESSES = ("xla", "kernel")
TERMS_BACKWARDS = ("kernel", "xla")


@dataclasses.dataclass(frozen=True)
class PathBlocks:
    block: int
    num_warps: int | None = None  # Triton settings on GPU (None: Pallas' defaults)
    num_stages: int | None = None
    backward: str = "kernels"
    superblock: int | None = None
    forward_superblock: int | None = None  # key blocks per super-block of the forward kernel (None: default_superblock)
    preprocess: str = "kernel"
    terms_backward: str = "kernel"
    prep_sub_block: int = 32  # the preprocessing kernel's inverse blocks
    float32_dots: str = "tf32x3"  # products of the UT system and its pullback (gdn.float32_dots)
    save_block_terms: bool = True  # the forward's 𝒯, k̄, P kept for the kernels' backward (not rebuilt)

    @property
    def saves_block_terms(self) -> bool:
        """Whether the forward keeps its block terms as residuals: asked for, and read by the backward (the
        Pallas backward with the block terms on kernels)."""
        return self.save_block_terms and self.backward == "kernels" and self.terms_backward == "kernel"


def default_superblock(num_blocks: int) -> int:
    """Key blocks per super-block, ``⌈√N⌉`` for N blocks: it balances a query block's moves past the earlier
    super-blocks (one per super-block, ≈ n / S for block n) against those inside its own super-block (one per
    block, ≈ S / 2), whose sum over the N query blocks, ≈ N·S / 2 + N² / (2S), is least at S = √N."""
    return max(1, math.isqrt(num_blocks - 1) + 1) if num_blocks > 1 else 1


def superblock_or_default(superblock: int | None, num_blocks: int) -> int:
    """``superblock``, or ``default_superblock(num_blocks)`` when it is None."""
    return default_superblock(num_blocks) if superblock is None else superblock


def _is_power_of_two_from_16(value: int) -> bool:
    return value >= 16 and not value & (value - 1)


def default_terms_path(dtype) -> str:
    """Where the block terms are built and pulled back when the caller names neither: ``"kernel"``, but
    ``"xla"`` for float32 inputs on GPU, where the kernels' IEEE float32 products took minutes to compile
    (the terms-backward kernel at D = 64 on an H100 ran past a 7-minute limit)."""
    return "xla" if backend() == "gpu" and jnp.dtype(dtype) == jnp.float32 else "kernel"


def path_blocks(head_dim: int, dtype, block_size: int | None = None, backward: str = "kernels",
                superblock: int | None = None, preprocess: str | None = None,
                terms_backward: str | None = None, forward_superblock: int | None = None,
                save_block_terms: bool = True) -> PathBlocks:
    """Block size for ``head_dim`` and input ``dtype``; ``UnsupportedShapeError`` (naming the field and what
    is allowed) for shapes and dtypes the kernels do not handle, ValueError for an unknown ``backward``,
    ``preprocess`` or ``terms_backward`` or a ``superblock`` / ``forward_superblock`` that is not a positive integer
    (either None: ``default_superblock`` of the sequence's block count). ``preprocess`` /
    ``terms_backward`` None: ``default_terms_path(dtype)``."""
    preprocess = default_terms_path(dtype) if preprocess is None else preprocess
    terms_backward = default_terms_path(dtype) if terms_backward is None else terms_backward
    if backward not in BACKWARDS:
        raise ValueError(f"path pallas kernel: backward={backward!r} must be one of {BACKWARDS}")
    if preprocess not in PREPROCESSES:
        raise ValueError(f"path pallas kernel: preprocess={preprocess!r} must be one of {PREPROCESSES}")
    if terms_backward not in TERMS_BACKWARDS:
        raise ValueError(f"path pallas kernel: terms_backward={terms_backward!r} must be one of {TERMS_BACKWARDS}")
    for name, count in (("superblock", superblock), ("forward_superblock", forward_superblock)):
        if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count > 0):
            raise ValueError(f"path pallas kernel: {name}={count!r} must be a positive integer or None")
    if not _is_power_of_two_from_16(head_dim):
        raise UnsupportedShapeError(f"path pallas kernel: head_dim={head_dim} must be a power of two >= 16 "
                                    "(use impl='blockwise', or impl='auto' to fall back automatically)")
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        raise UnsupportedShapeError(f"path pallas kernel: dtype={jnp.dtype(dtype).name} must be one of "
                                    f"{[d.name for d in SUPPORTED_DTYPES]} (use impl='blockwise')")
    block = DEFAULT_BLOCK[backend()] if block_size is None else block_size
    if not (isinstance(block, int) and _is_power_of_two_from_16(block)):
        raise UnsupportedShapeError(f"path pallas kernel: block_size={block!r} must be a power of two >= 16")
    if backend() == "gpu" and head_dim > 128:
        raise UnsupportedShapeError(f"path pallas kernel: head_dim={head_dim} must be <= 128 on GPU (a float32 "
                                    "D x D block product must fit in shared memory; use impl='blockwise')")
    # One pipeline stage on GPU. Each stage of the key loops holds a float32 D x D block product (64 KiB at
    # D = 128) next to the key and value tiles: Pallas' default stages asked an H100 for 384 KiB at D = 128 (it
    # has 227 KiB). At D = 64 one stage is also faster (H100, 32 x 4096 x 32 x 64): query-side backward 105 ms
    # against 175 ms with the default, key side 62 against 84, forward 33.2 against 33.5.
    num_stages = 1 if backend() == "gpu" else None
    return PathBlocks(block=block, num_stages=num_stages, backward=backward, superblock=superblock,
                      forward_superblock=forward_superblock, save_block_terms=bool(save_block_terms),
                      preprocess=preprocess, terms_backward=terms_backward, prep_sub_block=min(32, block))
