"""Errors jaxlm raises for bad user input, and the small checks config validation shares."""

import math

import numpy as np


class ConfigError(ValueError):
    """A config field has a bad value. The message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config field {field!r} = {value!r} is invalid: {allowed}")


def require(condition: bool, field: str, value: object, allowed: str) -> None:
    """Raise ``ConfigError(field, value, allowed)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, value, allowed)


def is_int(value: object) -> bool:
    """An int that is not a bool (config values come from the command line and files)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, or does not fit the model/optimizer being restored."""
