"""Tests for jaxlm.checkpoint: sharded round trips, keep/save schedules, and every error path."""

import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.checkpoint import CheckpointConfig, Checkpointer, read_metadata
from jaxlm.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))


def make_state(mesh, seed):
    """A train-state-like pytree with float32, bfloat16 and int32 leaves, sharded over a (4, 2) mesh."""
    rng = np.random.default_rng(seed)
    host = {
        "params": {
            "w": rng.standard_normal((12, 6)).astype(np.float32),                   # [12, 6]
            "embed": rng.standard_normal((8, 5)).astype(jnp.bfloat16),              # [8, 5]
        },
        "opt": {
            "mu": [rng.standard_normal((7, 3)).astype(np.float32)],                 # [7, 3]
            "count": np.int32(rng.integers(1, 1000)),
        },
    }
    specs = {"params": {"w": P("data", "tensor"), "embed": P("data", None)},
             "opt": {"mu": [P()], "count": P()}}
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), host, specs)


def abstract_of(state, respec=None):
    """ShapeDtypeStructs with the state's shardings (or shardings from ``respec(path, leaf)``)."""
    def to_abstract(path, leaf):
        sharding = respec(path, leaf) if respec else leaf.sharding
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return jax.tree_util.tree_map_with_path(to_abstract, state)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(e, np.float64))


def save_steps(checkpointer, mesh, steps, force=False):
    """Save ``make_state(mesh, step)`` at each step; return {step: state} of those actually saved."""
    saved = {}
    for step in steps:
        state = make_state(mesh, step)
        if checkpointer.save(step, train_state=state, data_state={"pos": step}, metadata={"step": step},
                             force=force):
            saved[step] = state
    checkpointer.wait_until_finished()
    return saved


def test_sharded_round_trip_restores_values_dtypes_and_shardings(tmp_path, mesh):
    state = make_state(mesh, seed=11)
    data_state = {"epoch": 2, "offsets": [3, 17, 29], "name": "shard-0"}
    metadata = {"model": {"d_model": 48, "mixer": "attention"}, "lr": 3e-4, "note": None}
    with Checkpointer(tmp_path / "ckpt", save_every=10, async_save=True) as checkpointer:
        assert checkpointer.save(30, train_state=state, data_state=data_state, metadata=metadata)
        # no explicit wait: restore waits for the asynchronous save to commit
        restored, restored_data, restored_meta = checkpointer.restore(abstract_train_state=abstract_of(state))
    assert_trees_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert restored_data == data_state and restored_meta == metadata


def test_restore_into_a_different_sharding(tmp_path, mesh):
    state = make_state(mesh, seed=5)
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, train_state=state, data_state={}, metadata={}, force=True)
        target = NamedSharding(mesh, P("tensor", None))  # saved as P("data", "tensor") / P("data", None)
        in_params = lambda path: path[0].key == "params"  # noqa: E731
        abstract = abstract_of(state, lambda path, leaf: target if in_params(path) else leaf.sharding)
        restored, _, _ = checkpointer.restore(1, abstract_train_state=abstract)
    assert_trees_equal(restored, state)
    assert restored["params"]["w"].sharding.is_equivalent_to(target, 2)
    assert restored["params"]["embed"].sharding.is_equivalent_to(target, 2)


def test_keep_last_n_and_restore_of_an_older_kept_step(tmp_path, mesh):
    with Checkpointer(tmp_path, save_every=1, keep=2) as checkpointer:
        saved = save_steps(checkpointer, mesh, range(1, 6))
        assert checkpointer.all_steps() == [4, 5]
        assert checkpointer.latest_step() == 5
        restored, data_state, metadata = checkpointer.restore(
            4, abstract_train_state=abstract_of(saved[4]))
    assert_trees_equal(restored, saved[4])
    assert data_state == {"pos": 4} and metadata == {"step": 4}


def test_save_every_schedule_force_and_duplicate_step(tmp_path, mesh):
    with Checkpointer(tmp_path / "a", save_every=3, keep=10) as checkpointer:
        saved = save_steps(checkpointer, mesh, range(1, 11))
        assert sorted(saved) == [3, 6, 9]
        assert checkpointer.save(10, train_state=make_state(mesh, 10), data_state={}, metadata={}, force=True)
        # the final step may coincide with a scheduled one: saving it again is skipped, not an error
        assert not checkpointer.save(9, train_state=make_state(mesh, 9), data_state={}, metadata={}, force=True)
        assert checkpointer.all_steps() == [3, 6, 9, 10]
    with Checkpointer(tmp_path / "b", save_every=0) as checkpointer:
        assert sorted(save_steps(checkpointer, mesh, [500, 1000])) == []
        assert sorted(save_steps(checkpointer, mesh, [1234], force=True)) == [1234]


def test_metadata_round_trip_by_step_and_latest(tmp_path, mesh):
    with Checkpointer(tmp_path, save_every=1, keep=5) as checkpointer:
        save_steps(checkpointer, mesh, [2, 7])
    assert read_metadata(str(tmp_path)) == {"step": 7}
    assert read_metadata(str(tmp_path), step=2) == {"step": 2}


def test_missing_and_empty_directory_errors(tmp_path, mesh):
    abstract = abstract_of(make_state(mesh, 0))
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        Checkpointer(missing).restore(abstract_train_state=abstract)
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        read_metadata(str(missing))
    assert Checkpointer(missing).latest_step() is None and not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint found in .*empty"):
        Checkpointer(empty).restore(abstract_train_state=abstract)


def test_missing_step_lists_available_steps(tmp_path, mesh):
    with Checkpointer(tmp_path, save_every=2) as checkpointer:
        saved = save_steps(checkpointer, mesh, [2, 4])
        with pytest.raises(CheckpointError, match=r"step 3 not found.*available steps: \[2, 4\]"):
            checkpointer.restore(3, abstract_train_state=abstract_of(saved[2]))


def test_incompatible_shape_dtype_and_keys_are_named_before_restoring(tmp_path, mesh):
    state = make_state(mesh, seed=3)
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, train_state=state, data_state={}, metadata={}, force=True)
        replicated = NamedSharding(mesh, P())

        wrong_shape = abstract_of(state)
        wrong_shape["params"]["w"] = jax.ShapeDtypeStruct((12, 8), jnp.float32, sharding=replicated)
        with pytest.raises(CheckpointError, match=r"'params/w': expected shape \(12, 8\) dtype float32, "
                                                  r"found shape \(12, 6\) dtype float32"):
            checkpointer.restore(1, abstract_train_state=wrong_shape)

        wrong_dtype = abstract_of(state)
        wrong_dtype["opt"]["mu"][0] = jax.ShapeDtypeStruct((7, 3), jnp.bfloat16, sharding=replicated)
        with pytest.raises(CheckpointError, match=r"'opt/mu/0': expected shape \(7, 3\) dtype bfloat16, "
                                                  r"found shape \(7, 3\) dtype float32"):
            checkpointer.restore(1, abstract_train_state=wrong_dtype)

        wrong_keys = abstract_of(state)
        wrong_keys["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated)
        del wrong_keys["opt"]["count"]
        with pytest.raises(CheckpointError) as error:
            checkpointer.restore(1, abstract_train_state=wrong_keys)
    message = str(error.value)
    assert "missing from the checkpoint: 'params/extra'" in message
    assert "in the checkpoint but not in the state: 'opt/count'" in message


def test_uncommitted_temp_dir_is_never_latest_and_reported_incomplete(tmp_path, mesh):
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        saved = save_steps(checkpointer, mesh, [4])
    # what an interrupted save of step 6 leaves behind: orbax's temporary name, no commit marker
    shutil.copytree(tmp_path / "4", tmp_path / "6.orbax-checkpoint-tmp")
    (tmp_path / "6.orbax-checkpoint-tmp" / "commit_success.txt").unlink(missing_ok=True)
    abstract = abstract_of(saved[4])
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 4 and checkpointer.incomplete_steps() == [6]
        restored, data_state, _ = checkpointer.restore(abstract_train_state=abstract)
        assert_trees_equal(restored, saved[4])
        assert data_state == {"pos": 4}
        with pytest.raises(CheckpointError, match=r"step 6 .* is incomplete.*complete steps: \[4\]"):
            checkpointer.restore(6, abstract_train_state=abstract)
    shutil.rmtree(tmp_path / "4")
    with pytest.raises(CheckpointError, match=r"no checkpoint found .*uncommitted saves of steps \[6\]"):
        Checkpointer(tmp_path).restore(abstract_train_state=abstract)


KILLED_SAVE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np, jax
    from jaxlm.checkpoint import Checkpointer
    directory = sys.argv[1]
    checkpointer = Checkpointer(directory, save_every=1, keep=1, async_save=True)
    first = {"w": np.arange(35, dtype=np.float32).reshape(5, 7) / 7.0}
    checkpointer.save(1, train_state=first, data_state={"pos": 1}, metadata={"step": 1})
    checkpointer.wait_until_finished()
    big = {"w": np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)}
    checkpointer.save(2, train_state=big, data_state={"pos": 2}, metadata={"step": 2})
    deadline = time.time() + 60
    while time.time() < deadline:
        names = os.listdir(directory)
        if any(name.startswith("2.orbax-checkpoint-tmp") for name in names):
            print("KILLED-WHILE-WRITING", flush=True)
            os._exit(17)  # the job dies mid-save: no cleanup, no commit
        if "2" in names:
            print("SAVE-FINISHED-FIRST", flush=True)
            os._exit(18)
""")


def test_killed_save_keeps_previous_checkpoint_restorable(tmp_path):
    directory = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE_SCRIPT, str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 17, result.stdout + result.stderr[-2000:]
    device = jax.devices()[0]
    abstract = {"w": jax.ShapeDtypeStruct((5, 7), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))}
    with Checkpointer(directory, keep=1) as checkpointer:
        assert checkpointer.latest_step() == 1  # keep=1, yet step 1 survives the crashed save of step 2
        assert checkpointer.incomplete_steps() == [2]
        restored, data_state, metadata = checkpointer.restore(abstract_train_state=abstract)
        with pytest.raises(CheckpointError, match="incomplete"):
            checkpointer.restore(2, abstract_train_state=abstract)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(35, dtype=np.float32).reshape(5, 7) / 7.0)
    assert data_state == {"pos": 1} and metadata == {"step": 1}


def test_non_json_items_are_rejected(tmp_path, mesh):
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        with pytest.raises(TypeError, match=r"'metadata' must be JSON-serialisable"):
            checkpointer.save(1, train_state=make_state(mesh, 1), data_state={}, metadata={"f": object()})
        with pytest.raises(TypeError, match=r"'data_state' must be a dict"):
            checkpointer.save(1, train_state=make_state(mesh, 1), data_state=b"raw", metadata={})


@pytest.mark.parametrize("field, value", [
    ("directory", 3), ("save_every", -1), ("save_every", 2.5), ("keep", 0), ("keep", True),
    ("async_save", "yes"),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"'checkpoint\.{field}'") as error:
        CheckpointConfig(**{field: value}).validate()
    assert error.value.field == f"checkpoint.{field}" and error.value.value == value


def test_from_config_uses_default_dir_only_when_directory_is_empty(tmp_path):
    config = CheckpointConfig(save_every=7, keep=4, async_save=False).validate()
    checkpointer = Checkpointer.from_config(config, str(tmp_path / "default"))
    assert str(checkpointer.directory) == str(tmp_path / "default")
    assert (checkpointer.save_every, checkpointer.keep, checkpointer.async_save) == (7, 4, False)
    explicit = Checkpointer.from_config(CheckpointConfig(directory=str(tmp_path / "mine")), "unused")
    assert str(explicit.directory) == str(tmp_path / "mine")
    assert checkpointer.should_save(14) and not checkpointer.should_save(15) and checkpointer.should_save(15, True)
