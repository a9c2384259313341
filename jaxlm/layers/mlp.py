"""Feed-forward layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
from flax import nnx

from jaxlm.layers.embed import dense

if TYPE_CHECKING:
    from jaxlm.models.config import ModelConfig


class SwiGLU(nnx.Module):
    """Gated MLP (Shazeer 2020, "GLU Variants Improve Transformer"): ``y = down(silu(gate(x)) * up(x))``.

    ``gate_proj``, ``up_proj``: ``[embed, mlp]``; ``down_proj``: ``[mlp, embed]`` (Llama names).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, hidden = config.d_model, config.mlp_dim
        self.gate_proj = dense(config, d, hidden, ("embed", "mlp"), rngs=rngs)
        self.up_proj = dense(config, d, hidden, ("embed", "mlp"), rngs=rngs)
        self.down_proj = dense(config, hidden, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, d_model]`` -> ``[B, T, d_model]`` in the compute dtype."""
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # [B, T, mlp]
        return self.down_proj(hidden)
