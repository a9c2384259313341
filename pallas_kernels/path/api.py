"""``path_attention_pallas``: PaTH attention (``jaxlm.ops.path_attention`` semantics) on the Pallas forward
kernel, as a ``jax.custom_vjp``.

Forward: the per-KV-head block terms (UT transform 𝒯, keys carried to their block end, block products) in
XLA or in the preprocessing kernel ``kernel_prep`` (``preprocess``), then ``kernel_fwd.path_forward``: one program per query block
builds its own intra-block logits and carried queries, scans the key blocks right to left, and also saves
the per-query log-sum-exp. Backward (exact either way): by default the Pallas kernels of ``kernel_bwd``
(``backward="kernels"``); ``backward="xla"`` runs the linear-memory XLA backward of
``jaxlm.ops.path_blockwise_vjp`` (the reference) fed with the kernel's output and log-sum-exp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.path_blockwise import block_products, keys_to_block_end, segment_blocks, to_blocks, ut_transform
from jaxlm.ops.path_blockwise_vjp import linear_memory_backward
from pallas_kernels.path.blocks import PathBlocks, path_blocks
from pallas_kernels.path.kernel_bwd import head_major, path_backward
from pallas_kernels.path.kernel_fwd import path_forward
from pallas_kernels.path.kernel_prep import path_preprocess


def path_attention_pallas(q, k, v, w, beta, log_f=None, segment_ids=None, *, scale: float | None = None,
                          block_size: int | None = None, backward_group_size: int = 4,
                          interpret=None, backward: str = "kernels", superblock: int | None = None,
                          preprocess: str = "xla") -> jax.Array:
    """``o_i = Σ_{j≤i} softmax_j(scale·q_iᵀ H_i … H_{j+1} k_j + G_i − G_j) v_j`` on the kernels.

    Arguments as in ``jaxlm.ops.path.path_attention`` (``q [B, T, H, D]``; ``k, v, w [B, T, G, D]``;
    ``beta [B, T, G]``; ``log_f [B, T, H]`` or None; ``segment_ids [B, T]`` or None), already validated
    there (None segment ids: one segment per row). ``block_size`` None picks the backend's default;
    ``interpret`` None runs interpret mode on CPU only (``pltpu.InterpretParams()`` interprets with TPU
    semantics). ``backward``: ``"kernels"`` (Pallas) or ``"xla"`` (the reference; ``backward_group_size``
    query blocks per scan); ``superblock``: key blocks per super-block of the Pallas backward's
    recomputation (None: ``kernel_bwd.default_superblock``); ``preprocess``: ``"xla"`` or ``"kernel"``, where
    the forward's per-block terms are computed (``blocks.PathBlocks``). Returns ``[B, T, H, D]`` in q's dtype.
    Raises ``UnsupportedShapeError`` for head dims, block sizes or dtypes the kernels do not handle.
    """
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    blocks = path_blocks(q.shape[-1], dtype, block_size, backward, superblock, preprocess)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _path_attention(scale, blocks, backward_group_size, interpret, q, k, v, w, beta, log_f, segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _path_attention(scale, blocks, group_size, interpret, q, k, v, w, beta, log_f, segment_ids):
    out, _ = _forward(scale, blocks, group_size, interpret, q, k, v, w, beta, log_f, segment_ids)
    return out


def _forward(scale, blocks: PathBlocks, group_size, interpret, q, k, v, w, beta, log_f, segment_ids):
    """Per-block precomputation, then the kernel; residuals are the inputs, the kernel's float32 output
    ``[B, H, T', D]`` and log-sum-exp ``[B, H, N, C]``."""
    batch, length, heads, dim = q.shape
    kernel_inputs = kernel_layout(q, k, v, w, beta, blocks.block, blocks.preprocess)
    gate = None
    if log_f is not None:
        gate = head_major(jnp.cumsum(log_f.astype(jnp.float32), axis=1)[..., None], blocks.block)[..., 0]
    segments = None
    if segment_ids is not None:
        segments = segment_blocks(segment_ids, batch, length, blocks.block).reshape(batch, -1)  # [B, T']
    out, logsumexp = path_forward(*kernel_inputs, gate, segments, block=blocks.block, scale=scale,
                                  interpret=interpret, num_warps=blocks.num_warps,
                                  num_stages=blocks.num_stages)  # [B, H, T', D], [B, H, N, C]
    sequence = out.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)  # [B, T, H, D]
    return sequence, (q, k, v, w, beta, log_f, segment_ids, out, logsumexp)


def _backward(scale, blocks: PathBlocks, group_size, interpret, residuals, d_out):
    """Exact cotangents from the Pallas backward kernels, or from the XLA reference when
    ``blocks.backward == "xla"``."""
    if blocks.backward == "xla":
        return linear_memory_backward(scale, blocks.block, group_size, blockwise_residuals(residuals), d_out)
    return path_backward(scale, blocks, interpret, residuals, d_out, blocks.superblock)


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


def kernel_layout(q, k, v, w, beta, block: int, preprocess: str = "xla") -> list[jax.Array]:
    """The kernel's inputs (``kernel_fwd`` module docstring) but the gate and segments: ``q [B, H, T', D]``
    and raw ``k, w [B, G, T', D]`` as given; carried keys ``k̄`` and values ``[B, G, T', D]`` in the inputs'
    dtype; per block 𝒯 ``[B, G, N·C, C]`` and products ``[B, G, N·D, D]`` float32, from
    ``jaxlm.ops.path_blockwise`` (``preprocess="xla"``) or the preprocessing kernel (``"kernel"``)."""
    kv_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if preprocess == "kernel":
        transform, carried, products = path_preprocess(*(padded_time_major(x, block) for x in (k, w, beta)),
                                                       block=block, carried_dtype=kv_dtype)
    else:
        transform, carried, products = xla_block_terms(k, w, beta, block, kv_dtype)
    return [head_major(q, block), head_major(k, block), head_major(w, block), transform, carried,
            head_major(v.astype(kv_dtype), block), products]


def padded_time_major(x: jax.Array, block: int) -> jax.Array:
    """``[B, T, ...]`` -> ``[B, T', ...]``, zero-padded to whole blocks (``β = 0`` there: H = I)."""
    return to_blocks(x, block).reshape(x.shape[0], -1, *x.shape[2:])


def xla_block_terms(k, w, beta, block: int, kv_dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``kernel_prep.path_preprocess``'s outputs (𝒯 ``[B, G, N·C, C]``, K̄ ``[B, G, T', D]``, P ``[B, G, N·D, D]``)
    from the XLA block terms of ``jaxlm.ops.path_blockwise``."""
    batch, _, num_groups, dim = k.shape
    kb, wb = (to_blocks(x.astype(jnp.float32), block) for x in (k, w))  # [B, N, C, G, D]
    transform = ut_transform(wb, to_blocks(beta.astype(jnp.float32), block))  # 𝒯  [B, N, G, C, C]
    keys_at_end = keys_to_block_end(kb, wb, transform)  # K̄  [B, N, C, G, D]
    products = block_products(wb, transform)  # P  [B, N, G, D, D]
    num_blocks = kb.shape[1]
    carried = jnp.moveaxis(keys_at_end, 3, 1).reshape(batch, num_groups, num_blocks * block, dim)
    return (jnp.moveaxis(transform, 2, 1).reshape(batch, num_groups, num_blocks * block, block),
            carried.astype(kv_dtype),
            jnp.moveaxis(products, 2, 1).reshape(batch, num_groups, num_blocks * dim, dim))
