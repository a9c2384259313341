"""Mesh construction, logical-name sharding rules, state/batch shardings and distributed start-up."""

import logging

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.errors import ConfigError
from jaxlm.parallel import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    initialize_distributed,
    logical_to_mesh_spec,
    make_mesh,
    shard_batch,
    state_shardings,
)
from jaxlm.parallel import mesh as mesh_module
from jaxlm.train.config import MeshConfig


@pytest.fixture(scope="module")
def mesh_222():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


# ---- mesh ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, shape", [
    (MeshConfig(), (8, 1, 1)),
    (MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
    (MeshConfig(data=1, fsdp=-1, tensor=2), (1, 4, 2)),
    (MeshConfig(data=4, fsdp=1, tensor=2), (4, 1, 2)),
])
def test_make_mesh_resolves_sizes(config, shape):
    mesh = make_mesh(config)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.devices.size == 8


def test_make_mesh_on_a_device_subset():
    mesh = make_mesh(MeshConfig(data=-1, tensor=2), devices=jax.devices()[:6])
    assert tuple(mesh.shape.values()) == (3, 1, 2)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices()[:6])


@pytest.mark.parametrize("config, field", [
    (MeshConfig(data=3, fsdp=1, tensor=1), "mesh.data"),  # 3 != 8 devices
    (MeshConfig(data=2, fsdp=2, tensor=4), "mesh.tensor"),  # 16 != 8
    (MeshConfig(data=-1, fsdp=3, tensor=1), "mesh.data"),  # 3 does not divide 8
    (MeshConfig(data=0, fsdp=1, tensor=1), "mesh.data"),
    (MeshConfig(data=2, fsdp=-2, tensor=1), "mesh.fsdp"),
    (MeshConfig(data=-1, fsdp=-1, tensor=1), "mesh.fsdp"),  # two wildcards
])
def test_mesh_config_errors_name_the_field(config, field):
    with pytest.raises(ConfigError) as info:
        make_mesh(config)
    assert info.value.field == field
    assert "8" in str(info.value) or "-1" in str(info.value) or "positive" in str(info.value)


# ---- logical rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("names, shape, expected", [
    (("vocab", "embed"), (48, 16), P("tensor", "fsdp")),
    (("embed", "mlp"), (16, 24), P("fsdp", "tensor")),
    (("embed", "heads", "head_dim"), (16, 6, 10), P("fsdp", "tensor", None)),
    (("embed", "kv_heads", "head_dim"), (16, 2, 10), P("fsdp", "tensor", None)),
    (("layers", "embed", "mlp"), (3, 16, 24), P(None, "fsdp", "tensor")),
    (("batch", None), (12, 7), P(("data", "fsdp"), None)),
    # fsdp already shards the batch dimension: embed falls back to replicated
    (("batch", None, "embed"), (12, 7, 16), P(("data", "fsdp"), None, None)),
    (("embed",), (16,), P("fsdp")),
])
def test_logical_names_map_to_mesh_axes(mesh_222, names, shape, expected):
    assert logical_to_mesh_spec(names, shape, mesh_222) == expected


def test_non_divisible_dimension_is_replicated_and_logged_once(mesh_222, caplog):
    caplog.set_level(logging.INFO, logger="jaxlm.parallel.sharding")
    for _ in range(3):
        # vocab 33 is not divisible by tensor=2; embed 16 is divisible by fsdp=2
        assert logical_to_mesh_spec(("vocab", "embed"), (33, 16), mesh_222) == P(None, "fsdp")
    # batch 6 is not divisible by data*fsdp = 4
    assert logical_to_mesh_spec(("batch", None), (6, 5), mesh_222) == P(None, None)
    fallback_logs = [r for r in caplog.records if "replicating" in r.getMessage()]
    assert len(fallback_logs) == 2
    assert "'vocab'" in fallback_logs[0].getMessage() and "33" in fallback_logs[0].getMessage()


def test_custom_rules_and_bad_names(mesh_222):
    rules = dict(LOGICAL_AXIS_RULES, mlp=("fsdp", "tensor"))
    assert logical_to_mesh_spec(("head_dim", "mlp"), (8, 24), mesh_222, rules) == P(None, ("fsdp", "tensor"))
    with pytest.raises(ValueError, match="'conv_width' has no sharding rule"):
        logical_to_mesh_spec(("conv_width", "embed"), (4, 16), mesh_222)
    with pytest.raises(ValueError, match="do not match the array shape"):
        logical_to_mesh_spec(("embed",), (16, 4), mesh_222)
    with pytest.raises(ValueError, match="mesh axis 'pipeline'"):
        logical_to_mesh_spec(("embed",), (16,), mesh_222, {"embed": "pipeline"})


# ---- state shardings -----------------------------------------------------------------------------

class Named(nnx.Module):
    """Params with logical names, one of them not divisible by the tensor axis."""

    def __init__(self, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (33, 16)), out_sharding=("vocab", "embed"))
        self.up = nnx.Param(jax.random.normal(rngs.params(), (16, 24)), out_sharding=("embed", "mlp"))
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (24,)), out_sharding=("mlp",))
        self.unnamed = nnx.Param(jax.random.normal(rngs.params(), (5, 3)))


def test_state_shardings_of_params_and_optimizer_moments(mesh_222):
    params = nnx.state(Named(nnx.Rngs(0)), nnx.Param)
    param_shardings = state_shardings(params, mesh_222)
    specs = {name: param_shardings[name].get_value().spec for name in ("table", "up", "bias", "unnamed")}
    assert specs == {"table": P(None, "fsdp"), "up": P("fsdp", "tensor"), "bias": P("tensor"), "unnamed": P(None, None)}

    opt_state = jax.eval_shape(optax.adam(1e-3).init, params)  # ShapeDtypeStruct leaves work too
    opt_shardings = state_shardings(opt_state, mesh_222)
    adam_shardings = opt_shardings[0]
    assert adam_shardings.count.spec == P()
    for moments in (adam_shardings.mu, adam_shardings.nu):
        assert {name: moments[name].get_value().spec for name in specs} == specs

    placed = jax.device_put(params, param_shardings)
    up = placed["up"].get_value()
    assert up.sharding.spec == P("fsdp", "tensor")
    assert {shard.data.shape for shard in up.addressable_shards} == {(8, 12)}
    np.testing.assert_array_equal(np.asarray(up), np.asarray(params["up"].get_value()))


# ---- batches -------------------------------------------------------------------------------------

def test_shard_batch_builds_global_arrays(mesh_222):
    rng = np.random.default_rng(1)
    batch = {"tokens": rng.integers(0, 100, (12, 7)).astype(np.int32),
             "loss_mask": rng.random((12, 7)).astype(np.float32)}
    global_batch = shard_batch(batch, mesh_222)
    assert batch_sharding(mesh_222).spec == P(("data", "fsdp"))
    for key, array in global_batch.items():
        assert array.shape == batch[key].shape and array.dtype == batch[key].dtype
        assert array.sharding.spec == P(("data", "fsdp"))
        assert {shard.data.shape for shard in array.addressable_shards} == {(3, 7)}
        np.testing.assert_array_equal(np.asarray(array), batch[key])
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        shard_batch({"tokens": batch["tokens"][:10]}, mesh_222)


# ---- distributed start-up ------------------------------------------------------------------------

DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAXLM_DISTRIBUTED")


@pytest.fixture
def recorded_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(mesh_module.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_initialize_distributed_is_a_no_op_on_one_host(recorded_initialize, monkeypatch):
    assert initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert initialize_distributed() is False
    assert recorded_initialize == []


def test_initialize_distributed_from_env(recorded_initialize, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert initialize_distributed() is True
    assert recorded_initialize == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be set"):
        initialize_distributed()


def test_initialize_distributed_auto_detection(recorded_initialize, monkeypatch):
    monkeypatch.setenv("JAXLM_DISTRIBUTED", "1")
    assert initialize_distributed() is True
    assert recorded_initialize == [{}]
