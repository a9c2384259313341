"""Registry of sequence mixers: the model builds each layer's mixer by name.

A mixer is an ``nnx.Module`` class registered under a name. Its constructor is
``cls(config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs)`` and it implements

- ``__call__(x, *, positions, segment_ids=None, cache=None) -> (y, cache)``
    with ``x: [B, T, d_model]``, ``positions: [B, T]`` int32 (absolute token positions; ``None`` means
  ``arange(T)`` in every row, which lets attention take the cuDNN causal fast path; never ``None`` with a cache),
    ``segment_ids: [B, T]`` int32 (packed sequences; 0 marks padding; with a cache they mark the right
  padding of a prefill, on which a mixer must leave its recurrent state unchanged) and ``cache`` the mixer's
    decode state (``None`` for training / full-sequence forward, in which case ``None`` is returned);
- ``init_cache(batch_size, max_length, dtype) -> cache``: an empty decode state (a pytree of arrays).

Later mixers (mamba2, gated_deltanet, loglinear_*, path) register themselves the same way; the
decoder never names a mixer class.
"""

from __future__ import annotations

from typing import Callable

MIXERS: dict[str, type] = {}


def register_mixer(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` buildable as the mixer called ``name``."""

    def decorate(cls: type) -> type:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer {name!r} is already registered to {MIXERS[name].__qualname__}")
        MIXERS[name] = cls
        return cls

    return decorate


def mixer_class(name: str) -> type:
    """The class registered as ``name``; a clear error listing the known mixers otherwise."""
    _import_builtin_mixers()
    try:
        return MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(MIXERS)}") from None


def registered_mixers() -> list[str]:
    _import_builtin_mixers()
    return sorted(MIXERS)


def _import_builtin_mixers() -> None:
    # Importing the layer modules runs their @register_mixer decorators.
    from jaxlm.layers import attention, gated_deltanet, loglinear, mamba2, path_attention  # noqa: F401
