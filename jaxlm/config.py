"""Run configuration: ml_collections ConfigDicts from `configs/*.py` become frozen, validated dataclasses.

Config files define ``get_config() -> ml_collections.ConfigDict`` with the sections ``model``, ``data``,
``optimizer``, ``mesh``, ``train`` and ``checkpoint``. :func:`run_config_from_dict` turns such a dict into a
:class:`RunConfig`; layers, ops and the trainer never see a ConfigDict. Every problem is reported as a
:class:`jaxlm.errors.ConfigError` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from jaxlm.checkpoint import CheckpointConfig
from jaxlm.data.config import DataConfig, required_vocab_size
from jaxlm.errors import ConfigError, require
from jaxlm.models.config import ModelConfig
from jaxlm.train.config import MeshConfig, OptimizerConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs, each section validated on its own and against the others."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def validate(self) -> "RunConfig":
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        needed = required_vocab_size(self.data)
        require(self.model.vocab_size >= needed, "model.vocab_size", self.model.vocab_size,
                f"at least {needed}, the vocabulary of data.source={self.data.source!r}")
        require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len", self.data.seq_len,
                f"at most model.max_seq_len={self.model.max_seq_len}")
        decay_end = self.optimizer.decay_steps or self.train.steps
        require(self.optimizer.warmup_steps < decay_end, "optimizer.warmup_steps", self.optimizer.warmup_steps,
                f"fewer than the decay end {decay_end} (optimizer.decay_steps, or train.steps when it is 0)")
        require(self.data.batch_size % self.train.grad_accum_steps == 0, "data.batch_size", self.data.batch_size,
                f"a multiple of train.grad_accum_steps={self.train.grad_accum_steps}")
        return self


SECTIONS: dict[str, type] = {field.name: field.type for field in dataclasses.fields(RunConfig)}


def run_config_from_dict(config: Mapping[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a (nested) mapping such as an ml_collections ConfigDict."""
    config = _to_plain_dict(config)
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(unknown[0], config[unknown[0]], f"a section among {sorted(SECTIONS)}")
    section_types = typing.get_type_hints(RunConfig)
    sections = {name: _dataclass_from_dict(section_types[name], config.get(name, {}), name) for name in SECTIONS}
    return RunConfig(**sections).validate()


def load_config_file(path: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Import ``path``, call its ``get_config()``, apply dotted ``overrides`` and validate."""
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "a path to an existing configs/*.py file")
    spec = importlib.util.spec_from_file_location(f"jaxlm_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError("--config", path, "a file defining get_config() -> ml_collections.ConfigDict")
    config = _to_plain_dict(module.get_config())
    for dotted, value in (overrides or {}).items():
        _set_dotted(config, dotted, value)
    return run_config_from_dict(config)


def default_config_dict():
    """An ml_collections ConfigDict holding every field at its default.

    Config files start from this and change what they need, so that ``--config.section.field=value``
    overrides (which ml_collections type-checks against the existing value) work for every field.
    """
    import ml_collections

    return ml_collections.ConfigDict(to_dict(RunConfig()))


def to_dict(config: RunConfig) -> dict[str, Any]:
    """A JSON-serialisable dict of the config (tuples become lists), stored in checkpoints and logs."""
    return dataclasses.asdict(config)


def _to_plain_dict(config: Any) -> Any:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {key: _to_plain_dict(value) for key, value in config.items()}
    return config


def _set_dotted(config: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, value, f"a field inside a section; {part!r} is not a section")
    node[leaf] = value


def _dataclass_from_dict(cls: type, values: Mapping[str, Any], section: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(section, values, "a mapping of field names to values")
    hints = typing.get_type_hints(cls)
    fields = {field.name for field in dataclasses.fields(cls)}
    for name in values:
        if name not in fields:
            raise ConfigError(f"{section}.{name}", values[name], f"a field of {section}: {sorted(fields)}")
    kwargs = {name: _coerce(values[name], hints[name], f"{section}.{name}") for name in values}
    return cls(**kwargs)


def _coerce(value: Any, annotation: Any, field: str) -> Any:
    """Check ``value`` against a dataclass field annotation; lists become tuples, ints become floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, field)
            except ConfigError:
                pass
        raise ConfigError(field, value, f"a value of type {annotation}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, value, "a list or tuple")
        item_types = typing.get_args(annotation)
        item_type = item_types[0] if item_types else Any
        return tuple(_coerce(item, item_type, field) for item in value)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return _dataclass_from_dict(annotation, value, field)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(field, value, "True or False")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(field, value, "an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(field, value, "a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(field, value, "a string")
    return value
