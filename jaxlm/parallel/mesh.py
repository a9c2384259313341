"""The device mesh ``("data", "fsdp", "tensor")`` and multi-host start-up."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

from jaxlm.train.config import MESH_AXES, MeshConfig

logger = logging.getLogger(__name__)

# Environment variables that describe a multi-host job explicitly.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Set to 1 to let jax detect the cluster itself (TPU pods, SLURM, Open MPI, ...).
AUTO_DETECT_ENV = "JAXLM_DISTRIBUTED"


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of ``devices`` (default: all) with axes ``("data", "fsdp", "tensor")``.

    The sizes come from ``config`` (one of them may be -1 to take the remaining devices); a
    ConfigError names the field when they do not multiply to the device count. Axes are of the
    ``Auto`` type: shardings are given explicitly to ``jax.jit``.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.axis_sizes(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def initialize_distributed() -> bool:
    """Start ``jax.distributed`` when this process is one of several hosts; return whether it did.

    A multi-host job is recognised by ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES > 1``
    (``JAX_PROCESS_ID`` then names this host), or by ``JAXLM_DISTRIBUTED=1``, which lets jax detect
    the cluster (TPU pod, SLURM, ...). On a single host this is a no-op. Call it before any other
    jax call.
    """
    coordinator = os.environ.get(COORDINATOR_ENV)
    num_processes = _int_env(NUM_PROCESSES_ENV)
    if coordinator and num_processes is not None and num_processes > 1:
        process_id = _int_env(PROCESS_ID_ENV)
        if process_id is None:
            raise ValueError(f"{PROCESS_ID_ENV} must be set (0..{num_processes - 1}) when "
                             f"{COORDINATOR_ENV} and {NUM_PROCESSES_ENV}={num_processes} are set")
        logger.info("jax.distributed: process %d of %d, coordinator %s", process_id, num_processes, coordinator)
        # CPU processes need a collectives backend to talk to each other; accelerators bring their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if os.environ.get(AUTO_DETECT_ENV, "0") == "1":
        logger.info("jax.distributed: cluster auto-detection (%s=1)", AUTO_DETECT_ENV)
        jax.distributed.initialize()
        return True
    return False


def _int_env(name: str) -> int | None:
    """The integer value of environment variable ``name``; None when unset."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None
