"""Errors jaxlm raises for bad user input."""


class ConfigError(ValueError):
    """A config field has a bad value. The message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config field {field!r} = {value!r} is invalid: {allowed}")


def require(condition: bool, field: str, value: object, allowed: str) -> None:
    """Raise ``ConfigError(field, value, allowed)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, value, allowed)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, or does not fit the model/optimizer being restored."""
