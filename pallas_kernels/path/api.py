"""``path_attention_pallas``: PaTH attention (``jaxlm.ops.path_attention`` semantics) on the Pallas forward
kernel, as a ``jax.custom_vjp``.

Forward: the per-KV-head block terms (UT transform 𝒯, keys carried to their block end, block products) in
XLA or in the preprocessing kernel ``kernel_prep`` (``preprocess``), the keys carried on to their super-block
end and the super-block products (``superblocks``), then ``kernel_fwd.path_forward``: one program per query
block builds its own intra-block logits and carried queries, scans the key blocks right to left, and also saves
the per-query log-sum-exp. Backward (exact either way): by default the Pallas kernels of ``kernel_bwd``
(``backward="kernels"``); ``backward="xla"`` runs the linear-memory XLA backward of
``jaxlm.ops.path_blockwise_vjp`` (the reference) fed with the kernel's output and log-sum-exp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.path_blockwise import segment_blocks
from jaxlm.ops.path_blockwise_vjp import linear_memory_backward
from pallas_kernels.path.blocks import PathBlocks, path_blocks, superblock_or_default
from pallas_kernels.path.kernel_bwd import path_backward
from pallas_kernels.path.kernel_fwd import path_forward
from pallas_kernels.path.layout import cumulative_gate, forward_layout, time_major


def path_attention_pallas(q, k, v, w, beta, log_f=None, segment_ids=None, *, scale: float | None = None,
                          block_size: int | None = None, backward_group_size: int = 4,
                          interpret=None, backward: str = "kernels", superblock: int | None = None,
                          preprocess: str | None = None, terms_backward: str | None = None,
                          forward_superblock: int | None = None, save_block_terms: bool = True) -> jax.Array:
    """``o_i = Σ_{j≤i} softmax_j(scale·q_iᵀ H_i … H_{j+1} k_j + G_i − G_j) v_j`` on the kernels.

    Arguments as in ``jaxlm.ops.path.path_attention`` (``q [B, T, H, D]``; ``k, v, w [B, T, G, D]``;
    ``beta [B, T, G]``; ``log_f [B, T, H]`` or None; ``segment_ids [B, T]`` or None), already validated
    there (None segment ids: one segment per row). ``block_size`` None picks the backend's default;
    ``interpret`` None runs interpret mode on CPU only (``pltpu.InterpretParams()`` interprets with TPU
    semantics). ``backward``: ``"kernels"`` (Pallas) or ``"xla"`` (the reference; ``backward_group_size``
    query blocks per scan); ``superblock``: key blocks per super-block of the Pallas backward's
    recomputation; ``forward_superblock``: key blocks per super-block of the forward kernel (either None:
    ``blocks.default_superblock``, ⌈√N⌉ for N blocks); ``preprocess``: ``"xla"`` or
    ``"kernel"``, where the forward's per-block terms are computed; ``terms_backward``: ``"kernel"`` or
    ``"xla"``, how the Pallas backward rebuilds and pulls back those terms (``blocks.PathBlocks``; None for either:
    ``blocks.default_terms_path``, the kernels except for float32 inputs on GPU); ``save_block_terms``: keep the
    forward's per-block terms for the kernels' backward (``blocks.PathBlocks``: faster, more residual memory).
    Returns ``[B, T, H, D]`` in q's dtype. Raises ``UnsupportedShapeError`` for head dims, block sizes or dtypes
    the kernels do not handle.
    """
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    blocks = path_blocks(q.shape[-1], dtype, block_size, backward, superblock, preprocess, terms_backward,
                         forward_superblock, save_block_terms)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _path_attention(scale, blocks, backward_group_size, interpret, q, k, v, w, beta, log_f, segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _path_attention(scale, blocks, group_size, interpret, q, k, v, w, beta, log_f, segment_ids):
    out, _ = _forward(scale, blocks, group_size, interpret, q, k, v, w, beta, log_f, segment_ids)
    return out


def _forward(scale, blocks: PathBlocks, group_size, interpret, q, k, v, w, beta, log_f, segment_ids):
    """Per-block precomputation, then the kernel; residuals are ``(the inputs, the kernel's float32 output
    ``[B, H, T', D]`` and log-sum-exp ``[B, H, N, C]``; the block terms (𝒯, k̄, P) when
    ``blocks.saves_block_terms``, else None)``."""
    batch, length, heads, dim = q.shape
    superblock = superblock_or_default(blocks.forward_superblock, -(-length // blocks.block))
    kernel_inputs = forward_layout(q, k, v, w, beta, blocks, superblock)
    gate = cumulative_gate(log_f, blocks.block)  # [B, H, T'] or None
    segments = None
    if segment_ids is not None:
        segments = segment_blocks(segment_ids, batch, length, blocks.block).reshape(batch, -1)  # [B, T']
    out, logsumexp = path_forward(*kernel_inputs, gate, segments, block=blocks.block,
                                  superblock=superblock, scale=scale,
                                  interpret=interpret, num_warps=blocks.num_warps,
                                  num_stages=blocks.num_stages)  # [B, H, T', D], [B, H, N, C]
    sequence = time_major(out, length, q.dtype)  # [B, T, H, D]
    block_terms = tuple(kernel_inputs[i] for i in (3, 4, 6)) if blocks.saves_block_terms else None
    return sequence, ((q, k, v, w, beta, log_f, segment_ids, out, logsumexp), block_terms)


def _backward(scale, blocks: PathBlocks, group_size, interpret, saved, d_out):
    """Exact cotangents from the Pallas backward kernels, or from the XLA reference when
    ``blocks.backward == "xla"``."""
    residuals, block_terms = saved
    if blocks.backward == "xla":
        return linear_memory_backward(scale, blocks.block, group_size, blockwise_residuals(residuals), d_out)
    return path_backward(scale, blocks, interpret, residuals, d_out, blocks.superblock, block_terms)


def blockwise_residuals(residuals):
    """The kernel-layout residuals in the layout of ``jaxlm.ops.path_blockwise.blockwise_forward``:
    output blocks ``[B, N, G, R, C, D]`` and log-sum-exp ``[B, N, G, R, C]``."""
    q, k, v, w, beta, log_f, segment_ids, out, logsumexp = residuals
    batch, heads, _, dim = out.shape
    num_groups = k.shape[2]
    _, _, num_blocks, block = logsumexp.shape
    out_blocks = out.reshape(batch, num_groups, heads // num_groups, num_blocks, block, dim)
    logsumexp = logsumexp.reshape(batch, num_groups, heads // num_groups, num_blocks, block)
    return (q, k, v, w, beta, log_f, segment_ids, out_blocks.transpose(0, 3, 1, 2, 4, 5),
            logsumexp.transpose(0, 3, 1, 2, 4))


_path_attention.defvjp(_forward, _backward)
