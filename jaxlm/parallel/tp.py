"""Megatron tensor parallelism inside ``jax.shard_map``: which mesh, which specs, one all-reduce per module.

Layout (Shoeybi et al. 2019, "Megatron-LM"): a module's input projections (attention q/k/v, MLP gate/up)
are split by output columns over the ``tensor`` mesh axis, its output projection (attention o, MLP down)
by input rows. Each device then computes the module on its own heads / hidden units, and the module's
output is the sum over devices of their partial outputs: ``y = sum_t h^(t)(x)``, one all-reduce of a
``[B, T, d_model]`` array per module. The parameter specs come from the parameters' logical axis names
(the names the sharding rules map to ``tensor``), so they agree with the GSPMD sharding of the train state.

Sequence-parallel variant (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4.2.2): between modules the residual stream is split over the sequence along ``tensor``
(device t holds tokens ``t T/n .. (t+1) T/n``), norms run on that chunk, each module all-gathers its normed
input over the sequence before the column-split projections and reduce-scatters its row-split output
(``psum_scatter``) instead of the all-reduce. An all-reduce is a reduce-scatter followed by an all-gather,
so the communicated bytes are the same, while activations outside the modules are ``n`` times smaller.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from jaxlm.errors import require
from jaxlm.parallel.sharding import LOGICAL_AXIS_RULES, logical_to_mesh_spec

TENSOR_AXIS = "tensor"


def current_tensor_mesh() -> AbstractMesh | None:
    """The mesh set with ``jax.set_mesh`` when its ``tensor`` axis has more than one device, else None.

    Tensor-parallel blocks read the mesh from this context (at trace time), so the model's API needs no
    mesh argument: ``with jax.set_mesh(mesh): step(state, batch)``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or TENSOR_AXIS not in mesh.axis_names or mesh.shape[TENSOR_AXIS] == 1:
        return None
    return mesh


def tensor_parallel_rules() -> dict[str, str | None]:
    """Logical axis name -> ``"tensor"`` for the names the sharding rules put on the tensor axis, else None.

    Inside a tensor-parallel ``shard_map`` every other mesh axis holds full copies of the block weights.
    """
    rules = {}
    for name, axes in LOGICAL_AXIS_RULES.items():
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        rules[name] = TENSOR_AXIS if TENSOR_AXIS in axes else None
    return rules


def param_specs(state: Any, mesh: AbstractMesh) -> Any:
    """A tree of ``PartitionSpec`` (one per ``nnx.Variable`` of ``state``) splitting only the tensor axis."""
    rules = tensor_parallel_rules()

    def to_spec(variable):
        names = tuple(nnx.get_partition_spec(variable).get_value())  # logical names from the metadata
        names = names + (None,) * (len(variable.shape) - len(names))
        return logical_to_mesh_spec(names, variable.shape, mesh, rules)

    return jax.tree.map(to_spec, state, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))


def batch_axes(mesh: AbstractMesh, batch_size: int) -> tuple[str, ...] | None:
    """The mesh axes that split the batch dimension inside the ``shard_map``: the batch rule's axes when
    ``batch_size`` divides evenly over them (a decode batch of 1 does not), else None (replicated)."""
    axes = LOGICAL_AXIS_RULES["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return axes if batch_size % size == 0 else None


def cache_spec(ndim: int, batch: tuple[str, ...] | None, stacked: bool) -> PartitionSpec:
    """Spec of a key/value cache array ``[(L,) B, S, G, D]``: batch as the batch, kv heads over ``tensor``."""
    spec = (batch, None, TENSOR_AXIS) + (None,) * (ndim - 3 - int(stacked))
    return PartitionSpec(*((None,) + spec if stacked else spec))


def check_tensor_parallel(config, tensor_size: int) -> None:
    """Raise ConfigError naming the first setting that Megatron tensor parallelism over ``tensor_size``
    devices cannot split (head counts, MLP width, non-attention mixers, o_proj biases)."""
    mixers = set(config.layer_mixers())
    require(mixers == {"attention"}, "model.mixer", tuple(sorted(mixers)),
            f"'attention' for every layer when the mesh tensor axis has {tensor_size} devices and the blocks "
            "run tensor-parallel (model.residual_mode != 'standard' or model.tp_shard_map)")
    for name in ("num_heads", "num_kv_heads", "mlp_dim"):
        value = getattr(config, name)
        require(value % tensor_size == 0, f"model.{name}", value,
                f"a multiple of the mesh tensor axis size {tensor_size} (tensor-parallel blocks split it)")
    require(not config.attention_bias, "model.attention_bias", config.attention_bias,
            "False under tensor parallelism (a row-split o_proj would add its bias once per device)")


def check_sequence_parallel(length: int, tensor_size: int) -> None:
    """Raise ConfigError unless a sequence of ``length`` tokens splits evenly over ``tensor_size`` devices."""
    require(length % tensor_size == 0, "model.tp_sequence_parallel", True,
            f"False when the sequence length {length} is not a multiple of the mesh tensor axis size "
            f"{tensor_size} (sequence parallelism splits the sequence over the tensor axis)")


def all_reduce(partial_sum: jax.Array) -> jax.Array:
    """``y = sum_t partial_sum^(t)`` over the tensor axis (inside a ``shard_map``)."""
    return jax.lax.psum(partial_sum, TENSOR_AXIS)


def mark_varying(x: jax.Array) -> jax.Array:
    """``x`` typed as varying over the tensor axis (a per-device partial sum), e.g. a zero scan carry."""
    return jax.lax.pcast(x, TENSOR_AXIS, to="varying")


def all_gather_sequence(chunk: jax.Array) -> jax.Array:
    """``[B, T/n, ...]`` -> ``[B, T, ...]``: the n devices' sequence chunks concatenated in tensor-axis order."""
    return jax.lax.all_gather(chunk, TENSOR_AXIS, axis=1, tiled=True)


def reduce_scatter_sequence(partial_sum: jax.Array) -> jax.Array:
    """``[B, T, ...]`` -> ``[B, T/n, ...]``: on device t, rows ``t T/n .. (t+1) T/n`` of the all-reduce's
    ``sum_s partial_sum^(s)``."""
    return jax.lax.psum_scatter(partial_sum, TENSOR_AXIS, scatter_dimension=1, tiled=True)


def repeat_sequence(chunk: jax.Array, tensor_size: int) -> jax.Array:
    """``[B, T/n, ...]`` -> ``[B, T, ...]``: this device's chunk repeated n times. The all-gather's output
    shape without communication (the sequence-parallel upper bound); not the gathered values."""
    return jnp.concatenate([chunk] * tensor_size, axis=1)


def own_sequence_chunk(partial_sum: jax.Array, tensor_size: int) -> jax.Array:
    """``[B, T, ...]`` -> ``[B, T/n, ...]``: rows ``t T/n .. (t+1) T/n`` of this device's own partial sum
    on device t. The reduce-scatter's output shape without communication (the sequence-parallel upper
    bound); not the summed values."""
    chunk_length = partial_sum.shape[1] // tensor_size
    start = jax.lax.axis_index(TENSOR_AXIS) * chunk_length
    return jax.lax.dynamic_slice_in_dim(partial_sum, start, chunk_length, axis=1)
