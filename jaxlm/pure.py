"""Pure-function view of NNX models for notebooks: ``params, apply = functional(model)``.

``params`` is the model's ``nnx.Param`` state (an ``nnx.State`` pytree of float32 arrays) and
``apply(params, tokens, ...)`` rebuilds the module from the closed-over graph definition and
non-parameter state, then calls it, so it can be jitted, differentiated and vmapped like any JAX
function. ``to_module(params, like=model)`` merges parameters back into a module.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx


def functional(model: nnx.Module) -> tuple[nnx.State, Callable[..., jax.Array]]:
    """Split ``model`` into ``(params, apply)`` with ``apply(params, tokens, *, positions=None,
    segment_ids=None) == model(tokens, positions=positions, segment_ids=segment_ids)``."""
    graphdef, params, other_state = nnx.split(model, nnx.Param, ...)

    def apply(params: nnx.State, tokens: jax.Array, *, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None) -> jax.Array:
        module = nnx.merge(graphdef, params, other_state)
        return module(tokens, positions=positions, segment_ids=segment_ids)

    return params, apply


def to_module(params: nnx.State, like: nnx.Module) -> nnx.Module:
    """A new module with ``like``'s structure and non-parameter state and the given ``params``
    (``like`` itself is not modified)."""
    graphdef, _, other_state = nnx.split(like, nnx.Param, ...)
    return nnx.merge(graphdef, params, other_state)
