"""Orbax checkpoints: save, resume and inspect training runs.

One checkpoint step is a directory ``<directory>/<step>/`` holding three items:

- ``train_state``: a pytree of (possibly sharded) jax arrays (parameters, optimizer state, step counter),
  written by Orbax ``StandardSave`` and restored straight into the shardings the caller asks for;
- ``data_state``: the input pipeline's iterator state, a JSON dict (``JsonSave``);
- ``metadata``: a JSON dict describing the run (its config), readable without building a model.

Orbax writes each step under a temporary name (``<step>.orbax-checkpoint-tmp...``) and commits it
atomically, and the keep-last-N policy deletes old steps only after the new one is committed, so a crash
during a save never loses the previous checkpoint and an interrupted save is never picked as latest.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxlm.errors import CheckpointError, is_int, require


# Orbax names a step directory that is still being written (or whose save was interrupted)
# "<step>.orbax-checkpoint-tmp" (older releases append "-<timestamp>").
_STEP_ENTRY = re.compile(r"^(\d+)(\.orbax-checkpoint-tmp.*)?$")
_MAX_LISTED_KEYS = 5


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often a run writes checkpoints.

    ``directory`` empty means the trainer uses ``<output_dir>/checkpoints``; ``save_every = 0`` saves only
    the final step; ``keep`` is the number of most recent checkpoints kept on disk.
    """

    directory: str = ""
    save_every: int = 500
    keep: int = 3
    async_save: bool = True

    def validate(self) -> "CheckpointConfig":
        """Check every field; raise ``ConfigError("checkpoint.<field>", ...)`` on the first bad one."""
        require(isinstance(self.directory, str), "checkpoint.directory", self.directory,
                "a path string ('' means <output_dir>/checkpoints)")
        require(is_int(self.save_every) and self.save_every >= 0, "checkpoint.save_every",
                self.save_every, "an integer >= 0 (0 saves only the final step)")
        require(is_int(self.keep) and self.keep >= 1, "checkpoint.keep", self.keep,
                "an integer >= 1 (number of most recent checkpoints kept)")
        require(isinstance(self.async_save, bool), "checkpoint.async_save", self.async_save,
                "True or False")
        return self


class Checkpointer:
    """Saves and restores ``(train_state, data_state, metadata)`` steps with an Orbax CheckpointManager.

    Every process of a multi-host job must call ``save`` and ``restore`` (Orbax synchronises them).
    Use as a context manager, or call ``close()`` to wait for pending asynchronous saves.
    """

    def __init__(self, directory: str, *, save_every: int = 500, keep: int = 3, async_save: bool = True):
        CheckpointConfig(str(directory), save_every, keep, async_save).validate()
        self._directory = epath.Path(directory)
        self.save_every = save_every
        self.keep = keep
        self.async_save = async_save
        self._manager: ocp.CheckpointManager | None = None

    @classmethod
    def from_config(cls, config: CheckpointConfig, default_dir: str) -> "Checkpointer":
        """Build from a ``CheckpointConfig``; an empty ``config.directory`` means ``default_dir``."""
        config.validate()
        return cls(config.directory or default_dir, save_every=config.save_every, keep=config.keep,
                   async_save=config.async_save)

    @property
    def directory(self) -> epath.Path:
        """The root directory holding one sub-directory per saved step."""
        return self._directory

    # ----------------------------------------------------------------------------------------- saving

    def should_save(self, step: int, force: bool = False) -> bool:
        """True when ``force`` or when ``save_every > 0`` and ``step % save_every == 0``."""
        return force or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, *, train_state: Any, data_state: dict, metadata: dict, force: bool = False) -> bool:
        """Save one step if the schedule (or ``force``) says so; return whether a save was started.

        Asynchronous by default: device arrays are copied to host before this returns, so the caller may
        donate or overwrite them; the files are written and committed in the background. A step that is
        already saved is not written again (returns False).
        """
        step = int(step)
        if not self.should_save(step, force):
            return False
        _require_json("data_state", data_state)
        _require_json("metadata", metadata)
        manager = self._open(create=True)
        if step in manager.all_steps():
            return False
        args = ocp.args.Composite(
            train_state=ocp.args.StandardSave(train_state),
            data_state=ocp.args.JsonSave(data_state),
            metadata=ocp.args.JsonSave(metadata),
        )
        return bool(manager.save(step, args=args, force=True))

    def wait_until_finished(self) -> None:
        """Block until every pending asynchronous save is committed (and old steps are pruned)."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's background resources."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- listing

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending (waits for a pending save; [] if the directory is missing)."""
        if not self._directory.exists():
            return []
        manager = self._open(create=False)
        manager.wait_until_finished()
        manager.reload()
        return sorted(manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none. Interrupted saves are never picked."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def incomplete_steps(self) -> list[int]:
        """Steps whose save started but was never committed (e.g. the job died while writing)."""
        if not self._directory.exists():
            return []
        committed = set(self.all_steps())
        started = {int(match.group(1)) for match in map(_STEP_ENTRY.match, _entry_names(self._directory))
                   if match}
        return sorted(started - committed)

    # -------------------------------------------------------------------------------------- restoring

    def restore(self, step: int | None = None, *, abstract_train_state: Any) -> tuple[Any, dict, dict]:
        """Restore ``(train_state, data_state, metadata)`` of ``step`` (default: the latest committed one).

        ``abstract_train_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding``; arrays are read
        straight into those shardings. The saved tree is compared with it first (paths, shapes, dtypes) and
        any difference raises a ``CheckpointError`` naming the leaf.
        """
        step = self._resolve_step(step)
        manager = self._open(create=False)
        saved_tree = manager.item_metadata(step)["train_state"]
        _check_compatible(abstract_train_state, saved_tree.tree, where=self._step_dir(step))
        restored = manager.restore(step, args=ocp.args.Composite(
            train_state=ocp.args.StandardRestore(abstract_train_state),
            data_state=ocp.args.JsonRestore(),
            metadata=ocp.args.JsonRestore(),
        ))
        return restored["train_state"], restored["data_state"], restored["metadata"]

    def read_metadata(self, step: int | None = None) -> dict:
        """The ``metadata`` dict saved with ``step`` (default: latest) without touching the arrays."""
        step = self._resolve_step(step)
        restored = self._open(create=False).restore(
            step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return restored["metadata"]

    # -------------------------------------------------------------------------------------- internals

    def _open(self, *, create: bool) -> ocp.CheckpointManager:
        """The Orbax manager, created on first use (the directory is only created when saving)."""
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep,
                create=create,
                enable_async_checkpointing=self.async_save,
            )
            handlers = {
                "train_state": ocp.StandardCheckpointHandler(),
                "data_state": ocp.JsonCheckpointHandler(),
                "metadata": ocp.JsonCheckpointHandler(),
            }
            self._manager = ocp.CheckpointManager(self._directory, item_handlers=handlers, options=options)
        return self._manager

    def _step_dir(self, step: int) -> epath.Path:
        return self._directory / str(step)

    def _resolve_step(self, step: int | None) -> int:
        """The committed step to read: ``step`` itself, or the latest; a CheckpointError otherwise."""
        if not self._directory.exists():
            raise CheckpointError(f"checkpoint directory {self._directory} does not exist: nothing to restore")
        committed = self.all_steps()
        if step is None:
            if not committed:
                raise CheckpointError(_nothing_found_message(self._directory, self.incomplete_steps()))
            return committed[-1]
        if step in committed:
            return step
        if step in self.incomplete_steps():
            raise CheckpointError(
                f"checkpoint step {step} in {self._directory} is incomplete: its save was interrupted before "
                f"Orbax committed it; complete steps: {committed or 'none'}")
        raise CheckpointError(
            f"checkpoint step {step} not found in {self._directory}; available steps: {committed or 'none'}")


def read_metadata(directory: str, step: int | None = None) -> dict:
    """The run metadata (e.g. its config) saved with ``step`` (default: latest) in ``directory``."""
    with Checkpointer(directory, async_save=False) as checkpointer:
        return checkpointer.read_metadata(step)


def _nothing_found_message(directory: epath.Path, incomplete: list[int]) -> str:
    message = f"no checkpoint found in {directory}"
    if incomplete:
        message += f" (only interrupted, uncommitted saves of steps {incomplete})"
    return message


def _entry_names(directory: epath.Path) -> list[str]:
    return [path.name for path in directory.iterdir()]


def _require_json(name: str, value: object) -> None:
    """Raise TypeError unless ``value`` is a JSON-serialisable dict."""
    if not isinstance(value, dict):
        raise TypeError(f"checkpoint item {name!r} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint item {name!r} must be JSON-serialisable "
                        f"(dict/list/str/int/float/bool/None): {error}") from None


# ---------------------------------------------------------------------------------- compatibility check

def _key_name(key: Any) -> str:
    """One path component as a plain string: dict keys, attribute names and sequence indices alike.

    Orbax stores namedtuples and dataclass-like nodes as dicts keyed by field name, so ``.mu`` in the
    live tree and ``['mu']`` in the saved tree both become ``mu``.
    """
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """Flatten a pytree into ``{"a/b/0/c": leaf}`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(key) for key in path): leaf for path, leaf in flat}


def _describe(leaf: Any) -> str:
    return f"shape {tuple(leaf.shape)} dtype {np.dtype(leaf.dtype).name}"


def _same_array_type(expected: Any, found: Any) -> bool:
    found_shape = getattr(found, "shape", None)
    found_dtype = getattr(found, "dtype", None)
    if found_shape is None or found_dtype is None:
        return True  # a non-array leaf (e.g. a Python scalar): Orbax restores it as saved
    return tuple(expected.shape) == tuple(found_shape) and np.dtype(expected.dtype) == np.dtype(found_dtype)


def _incompatibilities(expected_tree: Any, saved_tree: Any) -> list[str]:
    """Human-readable differences between the abstract state and a checkpoint's tree metadata.

    Lists keys missing from the checkpoint, keys the checkpoint has but the state does not, and the first
    leaf (in the state's flattening order) whose shape or dtype differs. Empty when they match.
    """
    expected = _leaves_by_path(expected_tree)
    found = _leaves_by_path(saved_tree)
    problems = []
    missing = [path for path in expected if path not in found]
    unexpected = [path for path in found if path not in expected]
    if missing:
        problems.append(f"missing from the checkpoint: {_short_list(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the state: {_short_list(unexpected)}")
    for path, leaf in expected.items():
        if path in found and not _same_array_type(leaf, found[path]):
            problems.append(f"leaf {path!r}: expected {_describe(leaf)}, found {_describe(found[path])}")
            break
    return problems


def _short_list(paths: list[str]) -> str:
    shown = ", ".join(repr(path) for path in paths[:_MAX_LISTED_KEYS])
    more = len(paths) - _MAX_LISTED_KEYS
    return shown + (f" (and {more} more)" if more > 0 else "")


def _check_compatible(expected_tree: Any, saved_tree: Any, *, where: epath.Path) -> None:
    """Raise CheckpointError when the checkpoint at ``where`` does not fit ``expected_tree``."""
    problems = _incompatibilities(expected_tree, saved_tree)
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match the state being restored: "
                              + "; ".join(problems))
