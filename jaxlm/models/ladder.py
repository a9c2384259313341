"""Residual wirings of the decoder blocks with explicit tensor-parallel all-reduces (Ladder residual).

Modules ``j = 1 .. 2L`` alternate attention and MLP; ``h_j`` is a module's branch with its pre-norm
(``DecoderBlock.mixer_branch`` / ``mlp_branch``) and ``AR`` the all-reduce that sums the per-device
partial outputs over the ``tensor`` mesh axis (Megatron layout, ``jaxlm.parallel.tp``):

- ``standard``:    ``x_j = x_{j-1} + AR(h_j(x_{j-1}))``
- ``parallel``:    ``x_l = x_{l-1} + AR(attn_l(x_{l-1}) + mlp_l(x_{l-1}))`` (one all-reduce per layer)
- ``ladder``:      ``r_j = r_{j-1} + AR(h_j(r_{j-2}))`` with ``r_{-1} = r_0 = embedding`` and final hidden
  state ``r_{2L} = r_{2L-2} + a_L + m_L`` (Zhang et al. 2025, "Ladder-residual", section 3). Module j
  never waits for module j-1's all-reduce, so that all-reduce overlaps module j's matmuls: the longest
  chain of dependent all-reduces is L instead of 2L.
- ``upper_bound``: the ladder's compute with ``AR`` replaced by the identity (no communication). Under
  tensor parallelism its outputs are not the model's (partial sums are never summed): a speed ceiling.

The ladder keeps its stream as ``(r, pending)``: ``r`` the reduced stream and ``pending`` the previous
module's un-reduced partial output. A ladder layer computes

    a = attn(r);  r = r + AR(pending);  pending' = mlp(r);  r = r + AR(a)

so each all-reduce's input was produced one module earlier than its result is needed. Under
``lax.scan`` the pending MLP partial sum is the scan carry (un-reduced), all-reduced at the top of the
next iteration; the first iteration all-reduces zeros.

With a mesh whose ``tensor`` axis has more than one device (``jax.set_mesh``), the whole layer stack
runs in one ``jax.shard_map`` over all mesh axes: weights split over ``tensor`` by their logical names,
the batch split over the batch axes, key/value caches split over kv heads. Without one, ``AR`` is the
identity and the wirings run as plain (GSPMD) code.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxlm.models.blocks import STACKED_LAYER_METADATA, BlockSequence, DecoderBlock, rematerialized
from jaxlm.models.config import ModelConfig
from jaxlm.parallel import tp

Reduce = Callable[[jax.Array], jax.Array]
# (reduced stream [B, T, d_model], pending un-reduced partial output [B, T, d_model] or None)
Stream = tuple[jax.Array, jax.Array | None]

# Per-jit XLA options for decoding with ladder blocks on GPU. XLA's all-reduce combiner merges
# independent all-reduces that are small enough into one; at decode shapes it fuses a ladder layer's two
# all-reduces (attention output, pending MLP output), whose results are then needed by the earlier
# consumer, so the overlap with the next module's matmuls is lost. A threshold of 0 bytes turns it off.
GPU_DECODE_COMPILER_OPTIONS = {"xla_gpu_all_reduce_combine_threshold_bytes": 0}


def decode_compiler_options(platform: str | None = None) -> dict[str, Any]:
    """``compiler_options`` for ``jax.jit`` of a decode function: ``GPU_DECODE_COMPILER_OPTIONS`` on GPU
    (``platform`` default: the default backend), none elsewhere (other backends reject GPU options)."""
    platform = jax.default_backend() if platform is None else platform
    return dict(GPU_DECODE_COMPILER_OPTIONS) if platform in ("gpu", "cuda", "rocm") else {}


def layer_residual_modes(config: ModelConfig) -> tuple[str, ...]:
    """The residual mode of every layer: ``config.residual_mode``, except that layers before
    ``config.ladder_start_layer`` of a ladder / upper-bound model are standard (converted models)."""
    ladder_like = config.residual_mode in ("ladder", "upper_bound")
    return tuple("standard" if ladder_like and layer < config.ladder_start_layer else config.residual_mode
                 for layer in range(config.num_layers))


def standard_layer(block: DecoderBlock, stream: Stream, reduce: Reduce, positions, segment_ids,
                   cache) -> tuple[Stream, Any]:
    """``x = x + AR(attn(x)); x = x + AR(mlp(x))`` after settling any pending partial sum."""
    x = settle(stream, reduce)
    mixed, cache = block.mixer_branch(x, positions=positions, segment_ids=segment_ids, cache=cache)
    x = x + reduce(mixed)
    x = x + reduce(block.mlp_branch(x))
    return (x, None), cache


def parallel_layer(block: DecoderBlock, stream: Stream, reduce: Reduce, positions, segment_ids,
                   cache) -> tuple[Stream, Any]:
    """``x = x + AR(attn(x) + mlp(x))``: both modules read the same input, one all-reduce per layer."""
    x = settle(stream, reduce)
    mixed, cache = block.mixer_branch(x, positions=positions, segment_ids=segment_ids, cache=cache)
    x = x + reduce(mixed + block.mlp_branch(x))
    return (x, None), cache


def ladder_layer(block: DecoderBlock, stream: Stream, reduce: Reduce, positions, segment_ids,
                 cache) -> tuple[Stream, Any]:
    """``a = attn(r); r = r + AR(pending); pending = mlp(r); r = r + AR(a)`` (module docstring)."""
    mixed, cache = block.mixer_branch(stream[0], positions=positions, segment_ids=segment_ids,
                                      cache=cache)  # partial, read from r without the pending MLP output
    x = settle(stream, reduce)
    mlp_partial = block.mlp_branch(x)  # [B, T, d_model]
    x = x + reduce(mixed)
    return (x, mlp_partial), cache


LAYER_WIRINGS = {"standard": standard_layer, "parallel": parallel_layer, "ladder": ladder_layer,
                 "upper_bound": ladder_layer}


def run_blocks(blocks, modes: tuple[str, ...], stream: Stream, reduce: Reduce, positions, segment_ids,
               caches, remat: str, prevent_cse: bool = True) -> tuple[Stream, Any]:
    """Apply ``blocks`` in order, block i wired by ``modes[i]``; each layer rematerialised with ``remat``.

    ``caches`` is a sequence with one entry per block, or None; returns the stream and the new caches
    (a tuple, or None).
    """
    new_caches = [None] * len(blocks) if caches is None else list(caches)
    for index, (block, mode) in enumerate(zip(blocks, modes)):
        layer = rematerialized(_wired_layer(LAYER_WIRINGS[mode], reduce), remat, prevent_cse)
        stream, new_caches[index] = layer(block, stream, positions, segment_ids, new_caches[index])
    return stream, None if caches is None else tuple(new_caches)


def _wired_layer(wiring, reduce: Reduce):
    """``(block, stream, positions, segment_ids, cache) -> (stream, cache)`` for one wiring (remat-able)."""

    def layer(block, stream, positions, segment_ids, cache):
        return wiring(block, stream, reduce, positions, segment_ids, cache)

    return layer


def settle(stream: Stream, reduce: Reduce) -> jax.Array:
    """The final hidden state ``r + AR(pending)`` (``r`` when nothing is pending)."""
    x, pending = stream
    return x if pending is None else x + reduce(pending)


def apply_unrolled(layers: BlockSequence, modes: tuple[str, ...], x, reduce: Reduce, positions, segment_ids,
                   cache) -> tuple[jax.Array, Any]:
    """The unrolled stack: ``[B, T, d_model]`` -> (final hidden state, tuple of block caches or None)."""
    stream, cache = run_blocks(layers.blocks, modes, (x, None), reduce, positions, segment_ids, cache,
                               layers.remat)
    return settle(stream, reduce), cache


def apply_scanned(layers, mode: str, x, reduce: Reduce, positions, segment_ids, cache,
                  zero_pending: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, Any]:
    """``nnx.scan`` over the stacked groups, the stream ``(r, pending)`` as the carry.

    Ladder modes carry the last MLP's partial sum un-reduced (``zero_pending(x)`` before the first group);
    the other modes carry no pending sum.
    """
    remat = layers.remat
    modes = (mode,) * len(layers.groups.blocks)
    pending = zero_pending(x) if LAYER_WIRINGS[mode] is ladder_layer else None

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None), out_axes=(nnx.Carry, 0),
              transform_metadata=STACKED_LAYER_METADATA)
    def scan_groups(stream, group, group_cache, positions, segment_ids):
        return run_blocks(group.blocks, modes, stream, reduce, positions, segment_ids, group_cache, remat,
                          prevent_cse=False)

    stream, cache = scan_groups((x, pending), layers.groups, cache, positions, segment_ids)
    return settle(stream, reduce), cache


def apply_layers(layers, config: ModelConfig, x: jax.Array, positions, segment_ids, cache) -> tuple[jax.Array, Any]:
    """The decoder layer stack in ``config.residual_mode``: ``[B, T, d_model]`` -> (``[B, T, d_model]``, cache).

    Runs tensor-parallel inside a ``shard_map`` when the current mesh has a ``tensor`` axis of size > 1.
    """
    mesh = tp.current_tensor_mesh()
    if mesh is None:
        return _apply_local(layers, config, x, positions, segment_ids, cache, tensor_parallel=False)
    tp.check_tensor_parallel(config, mesh.shape[tp.TENSOR_AXIS])
    graphdef, state = nnx.split(layers)
    batch = tp.batch_axes(mesh, x.shape[0])
    row_spec = PartitionSpec(batch)
    inputs = {"state": state, "x": x, "positions": positions, "segment_ids": segment_ids, "cache": cache}
    specs = {"state": tp.param_specs(state, mesh), "x": row_spec, "positions": row_spec,
             "segment_ids": row_spec,
             "cache": jax.tree.map(lambda a: tp.cache_spec(a.ndim, batch, config.scan_layers), cache)}
    present = [key for key, value in inputs.items() if value is not None]

    def local(*args):
        named = dict(zip(present, args))
        named_or_none = {key: named.get(key) for key in inputs}
        local_layers = nnx.merge(graphdef, named_or_none["state"])
        return _apply_local(local_layers, config, named_or_none["x"], named_or_none["positions"],
                            named_or_none["segment_ids"], named_or_none["cache"], tensor_parallel=True)

    out_specs = (row_spec, specs["cache"])
    # upper_bound never sums its partial outputs, so its stream is not replicated over the tensor axis.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs[key] for key in present),
                            out_specs=out_specs, check_vma=config.residual_mode != "upper_bound")
    return sharded(*(inputs[key] for key in present))


def _apply_local(layers, config: ModelConfig, x, positions, segment_ids, cache, *,
                 tensor_parallel: bool) -> tuple[jax.Array, Any]:
    """The stack on this device's weights; ``AR`` is the tensor all-reduce when ``tensor_parallel``."""
    communicates = tensor_parallel and config.residual_mode != "upper_bound"
    reduce = tp.all_reduce if communicates else (lambda partial: partial)
    if config.scan_layers:
        zero_pending = (lambda x: tp.mark_varying(jnp.zeros_like(x))) if communicates else jnp.zeros_like
        return apply_scanned(layers, config.residual_mode, x, reduce, positions, segment_ids, cache, zero_pending)
    return apply_unrolled(layers, layer_residual_modes(config), x, reduce, positions, segment_ids, cache)
