"""Residual wirings of the decoder blocks with explicit tensor-parallel all-reduces (Ladder residual).

Modules ``j = 1 .. 2L`` alternate attention and MLP; ``h_j`` is a module's branch with its pre-norm
(``mixer_branch`` / ``mlp_branch``) and ``AR`` the all-reduce that sums the per-device partial outputs
over the ``tensor`` mesh axis (Megatron layout, ``jaxlm.parallel.tp``):

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

Sequence parallelism (``config.tp_sequence_parallel``, ``jaxlm.parallel.tp``): the same wirings with
``h_j(x) = module_j(AG(norm_j(x)))`` and ``AR`` replaced by a reduce-scatter ``RS``. The stream ``r``
holds this device's chunk of the sequence ``[B, T/n, d_model]``; a pending partial output stays a full
``[B, T, d_model]`` partial sum until it is reduce-scattered one module later. ``upper_bound`` replaces
``AG`` / ``RS`` by copies of the same shapes (``tp.repeat_sequence`` / ``tp.own_sequence_chunk``).
Only calls without a cache (training and forward passes) run sequence-parallel; with a cache (prefill
and one-token decode steps) the stack keeps the all-reduce layout, since a one-token step has no
sequence to split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxlm.models.blocks import STACKED_LAYER_METADATA, BlockSequence, DecoderBlock, rematerialized
from jaxlm.models.config import ModelConfig
from jaxlm.parallel import tp

# (reduced stream [B, T, d_model] or its sequence chunk [B, T/n, d_model],
#  pending un-reduced partial output [B, T, d_model] or None)
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


def parse_compiler_options(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (command-line XLA options) as a ``compiler_options`` dict: ``true``/``false``
    become booleans, integers ints, anything else stays a string."""
    options = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"compiler option {item!r}: expected KEY=VALUE, e.g. xla_gpu_allow_all_reduce_kernel=false")
        lowered = value.lower()
        is_int = value.lstrip("-").isdigit()
        options[key] = (lowered == "true") if lowered in ("true", "false") else int(value) if is_int else value
    return options


def layer_residual_modes(config: ModelConfig) -> tuple[str, ...]:
    """The residual mode of every layer: ``config.residual_mode``, except that layers before
    ``config.ladder_start_layer`` of a ladder / upper-bound model are standard (converted models)."""
    ladder_like = config.residual_mode in ("ladder", "upper_bound")
    return tuple("standard" if ladder_like and layer < config.ladder_start_layer else config.residual_mode
                 for layer in range(config.num_layers))


def _identity(x: jax.Array) -> jax.Array:
    return x


@dataclasses.dataclass(frozen=True)
class Collectives:
    """The tensor-axis communication of the wirings: ``h_j(x) = module_j(gather(norm_j(x)))`` and
    ``x = x + reduce(partial)``.

    ``gather``: a normed module input as the stream holds it -> the full sequence the projections read.
    ``reduce``: a module's partial output ``[B, T, d_model]`` -> the term added to the stream.
    ``sequence_shards``: n when the stream holds a ``[B, T/n, d_model]`` sequence chunk, else 1.
    ``stream_replicated``: whether the stream is typed as replicated over the tensor axis while partial
    sums vary (the all-reduce layout inside a ``shard_map`` that checks it).
    """

    gather: Callable[[jax.Array], jax.Array] = _identity
    reduce: Callable[[jax.Array], jax.Array] = _identity
    sequence_shards: int = 1
    stream_replicated: bool = False

    def zero_partial(self, x: jax.Array) -> jax.Array:
        """A zero partial output ``[B, T, d_model]`` for the stream ``x [B, T / sequence_shards, d_model]``."""
        zeros = jnp.zeros_like(x)  # [B, T / sequence_shards, d_model], typed like x
        if self.sequence_shards > 1:
            zeros = tp.repeat_sequence(zeros, self.sequence_shards)  # [B, T, d_model]
        return tp.mark_varying(zeros) if self.stream_replicated else zeros


def layout_collectives(tensor_size: int, communicates: bool, sequence_parallel: bool) -> Collectives:
    """The ``Collectives`` of a layout on a tensor axis of ``tensor_size`` devices (1: none).

    all-reduce: ``gather = id``, ``reduce = AR``; sequence-parallel: ``gather = AG``, ``reduce = RS``.
    Without ``communicates`` (upper_bound) the collectives become copies of the same shapes.
    """
    if tensor_size == 1:
        return Collectives()
    if not sequence_parallel:
        return Collectives(reduce=tp.all_reduce, stream_replicated=True) if communicates else Collectives()
    if communicates:
        return Collectives(tp.all_gather_sequence, tp.reduce_scatter_sequence, tensor_size)
    return Collectives(lambda chunk: tp.repeat_sequence(chunk, tensor_size),
                       lambda partial: tp.own_sequence_chunk(partial, tensor_size), tensor_size)


def mixer_branch(block: DecoderBlock, x: jax.Array, comm: Collectives, positions, segment_ids,
                 cache) -> tuple[jax.Array, Any]:
    """``mixer(gather(mixer_norm(x)))``: the norm on the stream as held (a sequence chunk under sequence
    parallelism), the mixer on the full sequence; a partial sum under tensor parallelism."""
    normed = comm.gather(block.mixer_norm(x))  # [B, T, d_model]
    return block.mixer(normed, positions=positions, segment_ids=segment_ids, cache=cache)


def mlp_branch(block: DecoderBlock, x: jax.Array, comm: Collectives) -> jax.Array:
    """``mlp(gather(mlp_norm(x)))`` (``mixer_branch`` for the MLP module): ``[B, T, d_model]`` partial sum."""
    return block.mlp(comm.gather(block.mlp_norm(x)))


def standard_layer(block: DecoderBlock, stream: Stream, comm: Collectives, positions, segment_ids,
                   cache) -> tuple[Stream, Any]:
    """``x = x + AR(attn(x)); x = x + AR(mlp(x))`` after settling any pending partial sum."""
    x = settle(stream, comm)
    mixed, cache = mixer_branch(block, x, comm, positions, segment_ids, cache)
    x = x + comm.reduce(mixed)
    x = x + comm.reduce(mlp_branch(block, x, comm))
    return (x, None), cache


def parallel_layer(block: DecoderBlock, stream: Stream, comm: Collectives, positions, segment_ids,
                   cache) -> tuple[Stream, Any]:
    """``x = x + AR(attn(x) + mlp(x))``: both modules read the same input, one all-reduce per layer."""
    x = settle(stream, comm)
    mixed, cache = mixer_branch(block, x, comm, positions, segment_ids, cache)
    x = x + comm.reduce(mixed + mlp_branch(block, x, comm))
    return (x, None), cache


def ladder_layer(block: DecoderBlock, stream: Stream, comm: Collectives, positions, segment_ids,
                 cache) -> tuple[Stream, Any]:
    """``a = attn(r); r = r + AR(pending); pending = mlp(r); r = r + AR(a)`` (module docstring).

    With a cache (prefill and decode), two optimisation barriers pin that order. Without them XLA may fuse the MLP's pre-norm reduction with
    the next stream sum ``r + AR(a)`` (sibling multi-output fusion), so the MLP has to wait for ``AR(a)``,
    which then overlaps nothing; on GPU at batch-1 decode shapes this left half of the all-reduces
    synchronous (``benchmarks/ladder_hlo_check.py``).
    """
    # a partial sum, read from r without the pending MLP output
    decoding = cache is not None
    mixed, cache = mixer_branch(block, stream[0], comm, positions, segment_ids, cache)
    reduced, mixed = _ordered((stream[0], mixed), decoding)
    x = settle((reduced, stream[1]), comm)
    mlp_partial = mlp_branch(block, x, comm)  # [B, T, d_model]
    x, mlp_partial = _ordered((x, mlp_partial), decoding)
    x = x + comm.reduce(mixed)
    return (x, mlp_partial), cache


def _ordered(values: tuple, barrier: bool) -> tuple:
    """``values`` behind an optimisation barrier (nothing computed later can be fused into them) when
    ``barrier``; unchanged otherwise."""
    return jax.lax.optimization_barrier(values) if barrier else values


LAYER_WIRINGS = {"standard": standard_layer, "parallel": parallel_layer, "ladder": ladder_layer,
                 "upper_bound": ladder_layer}


def run_blocks(blocks, modes: tuple[str, ...], stream: Stream, comm: Collectives, positions, segment_ids,
               caches, remat: str, prevent_cse: bool = True) -> tuple[Stream, Any]:
    """Apply ``blocks`` in order, block i wired by ``modes[i]``; each layer rematerialised with ``remat``.

    ``caches`` is a sequence with one entry per block, or None; returns the stream and the new caches
    (a tuple, or None).
    """
    new_caches = [None] * len(blocks) if caches is None else list(caches)
    for index, (block, mode) in enumerate(zip(blocks, modes)):
        layer = rematerialized(_wired_layer(LAYER_WIRINGS[mode], comm), remat, prevent_cse)
        stream, new_caches[index] = layer(block, stream, positions, segment_ids, new_caches[index])
    return stream, None if caches is None else tuple(new_caches)


def _wired_layer(wiring, comm: Collectives):
    """``(block, stream, positions, segment_ids, cache) -> (stream, cache)`` for one wiring (remat-able)."""

    def layer(block, stream, positions, segment_ids, cache):
        return wiring(block, stream, comm, positions, segment_ids, cache)

    return layer


def settle(stream: Stream, comm: Collectives) -> jax.Array:
    """The final hidden state ``r + AR(pending)`` (``r`` when nothing is pending)."""
    x, pending = stream
    return x if pending is None else x + comm.reduce(pending)


def apply_unrolled(layers: BlockSequence, modes: tuple[str, ...], x, comm: Collectives, positions,
                   segment_ids, cache) -> tuple[jax.Array, Any]:
    """The unrolled stack: stream ``x`` -> (final hidden state, same shape; tuple of block caches or None)."""
    stream, cache = run_blocks(layers.blocks, modes, (x, None), comm, positions, segment_ids, cache,
                               layers.remat)
    return settle(stream, comm), cache


def apply_scanned(layers, mode: str, x, comm: Collectives, positions, segment_ids,
                  cache) -> tuple[jax.Array, Any]:
    """``nnx.scan`` over the stacked groups, the stream ``(r, pending)`` as the carry.

    Ladder modes carry the last MLP's partial sum un-reduced (``comm.zero_partial(x)`` before the first
    group); the other modes carry no pending sum.
    """
    remat = layers.remat
    modes = (mode,) * len(layers.groups.blocks)
    pending = comm.zero_partial(x) if LAYER_WIRINGS[mode] is ladder_layer else None

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None), out_axes=(nnx.Carry, 0),
              transform_metadata=STACKED_LAYER_METADATA)
    def scan_groups(stream, group, group_cache, positions, segment_ids):
        return run_blocks(group.blocks, modes, stream, comm, positions, segment_ids, group_cache, remat,
                          prevent_cse=False)

    stream, cache = scan_groups((x, pending), layers.groups, cache, positions, segment_ids)
    return settle(stream, comm), cache


def apply_layers(layers, config: ModelConfig, x: jax.Array, positions, segment_ids, cache) -> tuple[jax.Array, Any]:
    """The decoder layer stack in ``config.residual_mode``: ``[B, T, d_model]`` -> (``[B, T, d_model]``, cache).

    Runs tensor-parallel inside a ``shard_map`` when the current mesh has a ``tensor`` axis of size > 1;
    sequence-parallel there when ``config.tp_sequence_parallel`` and there is no cache (the stream enters
    and leaves the ``shard_map`` split over the sequence along ``tensor``; T must be a multiple of its size).
    """
    mesh = tp.current_tensor_mesh()
    if mesh is None:
        return _apply_local(layers, config, x, positions, segment_ids, cache, Collectives())
    tensor_size = mesh.shape[tp.TENSOR_AXIS]
    tp.check_tensor_parallel(config, tensor_size)
    sequence_parallel = config.tp_sequence_parallel and cache is None
    if sequence_parallel:
        tp.check_sequence_parallel(x.shape[1], tensor_size)
    communicates = config.residual_mode != "upper_bound"
    # The decode-order barriers of ``ladder_layer`` type every output as varying over the tensor axis in
    # some jax versions, so a cached ladder call runs unchecked, with the stream left untyped.
    checked = communicates and not (cache is not None and config.residual_mode == "ladder")
    comm = layout_collectives(tensor_size, communicates, sequence_parallel)
    if not checked:
        comm = dataclasses.replace(comm, stream_replicated=False)
    graphdef, state = nnx.split(layers)
    batch = tp.batch_axes(mesh, x.shape[0])
    row_spec = PartitionSpec(batch)
    stream_spec = PartitionSpec(batch, tp.TENSOR_AXIS) if sequence_parallel else row_spec
    inputs = {"state": state, "x": x, "positions": positions, "segment_ids": segment_ids, "cache": cache}
    specs = {"state": tp.param_specs(state, mesh), "x": stream_spec, "positions": row_spec,
             "segment_ids": row_spec,
             "cache": jax.tree.map(lambda a: tp.cache_spec(a.ndim, batch, config.scan_layers), cache)}
    present = [key for key, value in inputs.items() if value is not None]

    def local(*args):
        named = dict(zip(present, args))
        named_or_none = {key: named.get(key) for key in inputs}
        local_layers = nnx.merge(graphdef, named_or_none["state"])
        return _apply_local(local_layers, config, named_or_none["x"], named_or_none["positions"],
                            named_or_none["segment_ids"], named_or_none["cache"], comm)

    out_specs = (stream_spec, specs["cache"])
    # upper_bound never sums its partial outputs, so its stream is not replicated over the tensor axis.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs[key] for key in present),
                            out_specs=out_specs, check_vma=checked)
    return sharded(*(inputs[key] for key in present))


def _apply_local(layers, config: ModelConfig, x, positions, segment_ids, cache,
                 comm: Collectives) -> tuple[jax.Array, Any]:
    """The stack on this device's weights, communicating through ``comm``."""
    if config.scan_layers:
        return apply_scanned(layers, config.residual_mode, x, comm, positions, segment_ids, cache)
    return apply_unrolled(layers, layer_residual_modes(config), x, comm, positions, segment_ids, cache)
