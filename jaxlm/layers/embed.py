"""Parameter-owning linear maps: the token embedding (with tied logits) and dense projections."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:
    from jaxlm.models.config import ModelConfig



def normal_init(config: ModelConfig, logical_axes: tuple[str, ...]) -> nnx.Initializer:
    """Normal(0, ``config.init_std``) initialiser whose parameter carries ``logical_axes`` as metadata."""
    return nnx.with_partitioning(nnx.initializers.normal(config.init_std), logical_axes)


def dense(
    config: ModelConfig,
    in_features: int,
    out_features: int,
    logical_axes: tuple[str, str],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = False,
    output_dtype: jnp.dtype | None = None,
) -> nnx.Linear:
    """``y = x W (+ b)`` with ``W: [in, out]`` float32 named ``logical_axes``, computed in ``config.compute_dtype``.

    ``output_dtype`` (e.g. float32 for logits) sets the matmul's accumulation/result dtype.
    """
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=jnp.dtype(config.compute_dtype),
        param_dtype=jnp.float32,
        kernel_init=normal_init(config, logical_axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), logical_axes[1:]),
        preferred_element_type=output_dtype,
        rngs=rngs,
    )


class Embed(nnx.Module):
    """Token embedding ``e = E[token]`` with ``E: [vocab, embed]``; ``attend`` gives tied logits ``x E^T``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        init = normal_init(config, ("vocab", "embed"))
        self.embedding = nnx.Param(init(rngs.params(), (config.vocab_size, config.d_model), jnp.float32))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``[B, T]`` int tokens -> ``[B, T, d_model]`` embeddings in the compute dtype."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied-embedding logits ``z = x E^T``: ``[B, T, d_model]`` -> ``[B, T, vocab]`` float32."""
        embedding = self.embedding[...].astype(x.dtype)  # [V, d]
        return jnp.einsum("btd,vd->btv", x, embedding, preferred_element_type=jnp.float32)
