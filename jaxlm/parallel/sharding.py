"""Logical axis names -> mesh axes, and the shardings of params, optimizer state and batches.

Parameters carry logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ...) as variable
metadata. ``LOGICAL_AXIS_RULES`` is the one place that maps them to mesh axes; a dimension whose size
is not divisible by the size of its mesh axes is replicated instead (logged once).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None

# logical axis name -> mesh axis (or axes, or None for replicated).
LOGICAL_AXIS_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
}

_logged_fallbacks: set[tuple] = set()


def logical_to_mesh_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Mapping[str, MeshAxes] | None = None) -> PartitionSpec:
    """The PartitionSpec of an array of ``shape`` whose dimensions have logical ``names``.

    Dimension i goes to the mesh axes ``rules[names[i]]`` (None: replicated) unless ``shape[i]`` is
    not divisible by the product of those axes' sizes, or one of those axes already shards an
    earlier dimension; then it is replicated.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical axis names {names} do not match the array shape {tuple(shape)} "
                         f"(one name per dimension, None for unnamed)")
    used_axes: set[str] = set()
    spec = []
    for dim, (name, size) in enumerate(zip(names, shape)):
        axes = _mesh_axes_of(name, rules, mesh)
        if axes and used_axes.intersection(axes):
            axes = ()
        axes_size = math.prod(mesh.shape[axis] for axis in axes)
        if axes and size % axes_size != 0:
            _log_fallback_once(names, tuple(shape), dim, axes, axes_size)
            axes = ()
        used_axes.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Any:
    """A pytree of NamedSharding matching ``state`` (an nnx params state or an optimizer state).

    Each ``nnx.Variable`` is sharded by the logical names in its metadata; optimizer moments are
    trees of the same Variables, so they mirror their params. Any other array leaf (step counters,
    scalar hyperparameters) is replicated. Leaves may be arrays or ``jax.ShapeDtypeStruct``s.
    """
    def to_sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            names = tuple(nnx.get_partition_spec(leaf).get_value())  # logical names from the metadata
            names = names + (None,) * (len(leaf.shape) - len(names))
            return leaf.replace(NamedSharding(mesh, logical_to_mesh_spec(names, leaf.shape, mesh, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(to_sharding, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array: the batch dimension split over ``("data", "fsdp")``."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_AXIS_RULES["batch"]))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this host's ``[b, ...]`` slices of the batch (batch dim split over hosts).

    The global batch is ``b * jax.process_count()`` rows; it must be divisible by the number of
    batch shards ``data * fsdp``.
    """
    sharding = batch_sharding(mesh)
    batch_shards = math.prod(mesh.shape[axis] for axis in LOGICAL_AXIS_RULES["batch"])
    global_batch = {}
    for key, local in batch.items():
        local = np.asarray(local)
        rows = local.shape[0] * jax.process_count()
        if rows % batch_shards != 0:
            raise ValueError(f"batch[{key!r}] has a global batch size of {rows} rows, which is not divisible "
                             f"by the {batch_shards} batch shards (mesh data*fsdp); use a multiple of {batch_shards}")
        global_batch[key] = jax.make_array_from_process_local_data(sharding, local)
    return global_batch


def _mesh_axes_of(name: str | None, rules: Mapping[str, MeshAxes], mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that logical axis ``name`` maps to, as a tuple (empty: replicated)."""
    if name is None:
        return ()
    if name not in rules:
        raise ValueError(f"logical axis name {name!r} has no sharding rule; known names: {sorted(rules)} "
                         f"(add it to jaxlm.parallel.sharding.LOGICAL_AXIS_RULES)")
    axes = rules[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for axis in axes:
        if axis not in mesh.shape:
            raise ValueError(f"sharding rule {name!r} -> {rules[name]!r} names mesh axis {axis!r}, "
                             f"which is not in the mesh axes {tuple(mesh.shape)}")
    return axes


def _log_fallback_once(names: tuple, shape: tuple, dim: int, axes: tuple[str, ...], axes_size: int) -> None:
    key = (names, shape, dim, axes, axes_size)
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        logger.info("replicating dim %d (%r, size %d) of an array of shape %s: not divisible by mesh axes %s "
                    "of size %d", dim, names[dim], shape[dim], shape, axes, axes_size)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)
