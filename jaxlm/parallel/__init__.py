"""Device mesh, logical-axis sharding rules and multi-host start-up."""

from jaxlm.parallel.mesh import initialize_distributed, make_mesh
from jaxlm.parallel.sharding import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    logical_to_mesh_spec,
    shard_batch,
    state_shardings,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "batch_sharding",
    "initialize_distributed",
    "logical_to_mesh_spec",
    "make_mesh",
    "shard_batch",
    "state_shardings",
]
