"""Decoder building blocks: one pre-norm layer and the layer stacks (a Python loop, or a scan).

Every layer-like module here is called as ``layer(x, *, positions, segment_ids, cache) -> (x, cache)``
and builds its empty decode state with ``init_cache(batch_size, max_length)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.mlp import SwiGLU
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.registry import mixer_class
from jaxlm.models.config import ModelConfig

# remat name -> jax.checkpoint policy (None: save nothing, recompute everything in the backward pass).
REMAT_CHECKPOINT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
STACKED_LAYER_METADATA = {nnx.PARTITION_NAME: "layers"}


class DecoderBlock(nnx.Module):
    """Pre-norm residual layer: ``x = x + mixer(mixer_norm(x)); x = x + mlp(mlp_norm(x))``."""

    def __init__(self, config: ModelConfig, mixer_name: str, layer_index: int, *, rngs: nnx.Rngs):
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        self.mixer_norm = RMSNorm(config, rngs=rngs)
        self.mixer = mixer_class(mixer_name)(config, layer_index, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x: jax.Array, *, positions, segment_ids=None, cache=None) -> tuple[jax.Array, Any]:
        """``x: [B, T, d_model]`` -> (``[B, T, d_model]``, the mixer's updated cache or None)."""
        mixed, cache = self.mixer_branch(x, positions=positions, segment_ids=segment_ids, cache=cache)
        x = x + mixed
        x = x + self.mlp_branch(x)
        return x, cache

    def mixer_branch(self, x: jax.Array, *, positions, segment_ids=None, cache=None) -> tuple[jax.Array, Any]:
        """The mixer module's residual branch ``mixer(mixer_norm(x))``: ``[B, T, d_model]`` -> (same, cache).

        Inside a tensor-parallel ``shard_map`` the projections hold this device's heads, so the result
        is this device's partial sum of the branch (summed over the ``tensor`` axis by the caller).
        """
        return self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids, cache=cache)

    def mlp_branch(self, x: jax.Array) -> jax.Array:
        """The MLP module's residual branch ``mlp(mlp_norm(x))`` (a partial sum under tensor parallelism)."""
        return self.mlp(self.mlp_norm(x))

    def init_cache(self, batch_size: int, max_length: int) -> Any:
        """The mixer's empty decode state, in the compute dtype."""
        return self.mixer.init_cache(batch_size, max_length, self.compute_dtype)


def call_layer(layer: nnx.Module, x: jax.Array, positions, segment_ids, cache, remat: str,
               prevent_cse: bool = True) -> tuple[jax.Array, Any]:
    """``layer(x, ...)``, wrapped in ``nnx.remat`` with the policy named by ``remat`` unless it is "none"."""

    def forward(layer, x, positions, segment_ids, cache):
        return layer(x, positions=positions, segment_ids=segment_ids, cache=cache)

    return rematerialized(forward, remat, prevent_cse)(layer, x, positions, segment_ids, cache)


def rematerialized(fn, remat: str, prevent_cse: bool = True):
    """``fn`` wrapped in ``nnx.remat`` with the policy named by ``remat``; ``fn`` itself when it is "none"."""
    if remat == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_CHECKPOINT_POLICIES[remat], prevent_cse=prevent_cse)


class BlockSequence(nnx.Module):
    """Blocks applied in order in a Python loop, one per name in ``mixer_names``; each call rematerialised
    with ``remat``. The cache is a tuple with one entry per block, or None.

    Used unrolled for the whole model (``blocks[i]`` is layer i) and as the group a scan repeats.
    """

    def __init__(self, config: ModelConfig, mixer_names: tuple[str, ...], remat: str, *, rngs: nnx.Rngs):
        self.remat = remat
        self.blocks = nnx.List([
            DecoderBlock(config, name, index, rngs=rngs) for index, name in enumerate(mixer_names)
        ])

    def __call__(self, x: jax.Array, *, positions, segment_ids=None, cache=None) -> tuple[jax.Array, Any]:
        """Apply the blocks in order: ``[B, T, d_model]`` -> (``[B, T, d_model]``, tuple of block caches or None)."""
        block_caches = [None] * len(self.blocks) if cache is None else list(cache)
        for index, block in enumerate(self.blocks):
            x, block_caches[index] = call_layer(block, x, positions, segment_ids, block_caches[index], self.remat)
        return x, None if cache is None else tuple(block_caches)

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        """One empty mixer cache per block."""
        return tuple(block.init_cache(batch_size, max_length) for block in self.blocks)


class ScannedLayers(nnx.Module):
    """``num_layers / period`` repeats of one pattern period (a ``BlockSequence``), parameters stacked
    on a leading "layers" axis.

    Layer ``i`` is ``groups.blocks[i % period]`` at stack index ``i // period``. The forward pass is an
    ``nnx.scan`` over the stack; the cache is the group cache with every array stacked the same way.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.remat = config.remat
        repeats = config.num_layers // len(config.mixer_pattern)

        @nnx.split_rngs(splits=repeats)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=STACKED_LAYER_METADATA)
        def build_groups(rngs: nnx.Rngs) -> BlockSequence:
            return BlockSequence(config, config.mixer_pattern, "none", rngs=rngs)

        self.groups = build_groups(rngs)

    def __call__(self, x: jax.Array, *, positions, segment_ids=None, cache=None) -> tuple[jax.Array, Any]:
        """``nnx.scan`` the group over the stack: ``[B, T, d_model]`` -> (``[B, T, d_model]``, stacked cache
        or None)."""
        remat = self.remat

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None), out_axes=(nnx.Carry, 0),
                  transform_metadata=STACKED_LAYER_METADATA)
        def scan_groups(x, group, group_cache, positions, segment_ids):
            return call_layer(group, x, positions, segment_ids, group_cache, remat, prevent_cse=False)

        return scan_groups(x, self.groups, cache, positions, segment_ids)

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        """The group cache with a leading stack axis on every array."""

        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=STACKED_LAYER_METADATA)
        def stacked_cache(group: BlockSequence) -> tuple:
            return group.init_cache(batch_size, max_length)

        return stacked_cache(self.groups)
