"""Log-linear Mamba-2 and log-linear Gated DeltaNet mixers (Guo, Yang, Goel, Xing, Dao, Kim 2025, section 3).

Each is its base layer (``jaxlm.layers.mamba2.Mamba2``, ``jaxlm.layers.gated_deltanet.GatedDeltaNet``) with
the linear-attention op replaced by its log-linear form and one extra projection for the per-level weights

    λ_{t,h,ℓ} = softplus(L_{h,ℓ} · (x_t W_λ)_{h,ℓ}),      W_λ: [d_model, H·levels],  L: [H, levels] = 1 at init

(``L`` without weight decay). ``levels`` is ``config.loglinear.num_levels`` (0: ``ceil(log2 max_seq_len) + 1``).
The decode cache holds the base layer's conv states, the Fenwick level stack ``"levels" [B, H, levels, K, V]``
float32 and the per-row step counter ``"step" [B]`` int32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.errors import require
from jaxlm.layers.embed import dense
from jaxlm.layers.gated_deltanet import GatedDeltaNet
from jaxlm.layers.mamba2 import Mamba2
from jaxlm.layers.registry import register_mixer
from jaxlm.ops.fenwick import num_levels
from jaxlm.ops.loglinear import init_level_stack, loglinear_gated_delta_rule, loglinear_prefill, loglinear_ssd

if TYPE_CHECKING:
    from jaxlm.models.config import ModelConfig

LogLinearCache = dict[str, jax.Array]


def configured_levels(config: ModelConfig) -> int:
    """``config.loglinear.num_levels``, or ``ceil(log2 max_seq_len) + 1`` when it is 0.

    Fewer levels than ``max_seq_len`` needs is a ConfigError naming ``model.loglinear.num_levels``.
    """
    needed = num_levels(config.max_seq_len)
    levels = config.loglinear.num_levels or needed
    require(levels >= needed, "model.loglinear.num_levels", levels,
            f"0 (automatic) or at least ceil(log2 model.max_seq_len) + 1 = {needed} for max_seq_len="
            f"{config.max_seq_len}")
    return levels


class LevelWeights(nnx.Module):
    """``λ = softplus(L ⊙ (x W_λ))`` reshaped to ``[B, T, H, levels]`` float32 (Guo et al. 2025, section 3.1)."""

    def __init__(self, config: ModelConfig, num_heads: int, levels: int, *, rngs: nnx.Rngs):
        self.num_heads, self.levels = num_heads, levels
        self.proj = dense(config, config.d_model, num_heads * levels, ("embed", "heads"), rngs=rngs)
        self.level_scale = nnx.Param(jnp.ones((num_heads, levels), jnp.float32), out_sharding=(None, None),
                                     no_weight_decay=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, d_model]`` -> ``λ = softplus(L_{h,ℓ} · (x W_λ)_{h,ℓ})`` ``[B, T, H, levels]`` float32."""
        batch_size, length, _ = x.shape
        projected = self.proj(x).astype(jnp.float32).reshape(batch_size, length, self.num_heads, self.levels)
        return jax.nn.softplus(self.level_scale[...] * projected)  # [B, T, H, levels]


def level_cache(batch_size: int, num_heads: int, levels: int, key_dim: int, value_dim: int) -> LogLinearCache:
    """The log-linear part of a decode cache: an empty level stack and step counters at 0."""
    return {"levels": init_level_stack(batch_size, num_heads, levels, key_dim, value_dim),
            "step": jnp.zeros((batch_size,), jnp.int32)}


def attach_level_weights(layer: nnx.Module, config: ModelConfig, rngs: nnx.Rngs) -> None:
    """Give a base mixer its λ projection: ``layer.levels`` and ``layer.level_weights`` (over its heads)."""
    layer.levels = configured_levels(config)
    layer.level_weights = LevelWeights(config, layer.num_heads, layer.levels, rngs=rngs)


@register_mixer("loglinear_mamba2")
class LogLinearMamba2(Mamba2):
    """Mamba-2 with ``o = loglinear_ssd(q=C, k=B, v=x'·dt, log_a, λ)`` (module docstring); the rest of the
    layer (projections, conv, gates, ``D`` skip, gated RMSNorm) is ``Mamba2``'s."""

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        super().__init__(config, layer_index, rngs=rngs)
        attach_level_weights(self, config, rngs)

    def __call__(self, x: jax.Array, *, positions: jax.Array | None, segment_ids: jax.Array | None = None,
                 cache: LogLinearCache | None = None) -> tuple[jax.Array, LogLinearCache | None]:
        """``[B, T, d_model]`` -> (``[B, T, d_model]``, updated cache or None); arguments as ``Mamba2``.

        With a cache the T tokens continue each row's level stack; ``segment_ids == 0`` (right padding) leaves
        the stack, the step counter and the conv window unchanged.
        """
        del positions
        is_real = None if cache is None or segment_ids is None else segment_ids != 0  # [B, T]
        z, x_heads, q, k, v, log_a, conv_state = self._ssd_inputs(x, segment_ids, cache, is_real)
        lam = self.level_weights(x)  # [B, T, H, levels]
        new_cache = None
        if cache is None:
            out = loglinear_ssd(q, k, v, log_a, lam, impl=self.impl, chunk_size=self.chunk_size,
                                segment_ids=segment_ids)  # [B, T, H, P]
        else:
            out, levels, steps = loglinear_prefill(cache["levels"], cache["step"], q, k, v, log_a, None, lam,
                                                   real=is_real, chunk_size=self.chunk_size)
            new_cache = {"conv": conv_state, "levels": levels, "step": steps}
        return self._gated_output(out, x_heads, z), new_cache

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> LogLinearCache:
        """``{"conv": [B, W-1, E + 2·G·N], "levels": [B, H, levels, N, P] float32, "step": [B] int32}``."""
        conv = super().init_cache(batch_size, max_length, dtype)["conv"]
        return {"conv": conv, **level_cache(batch_size, self.num_heads, self.levels, self.state_dim, self.head_dim)}


@register_mixer("loglinear_gated_deltanet")
class LogLinearGatedDeltaNet(GatedDeltaNet):
    """Gated DeltaNet with ``o = loglinear_gated_delta_rule(q, k, v, log_a, β, λ)`` (module docstring); the
    projections, convs, normalisation, gates and output gate are ``GatedDeltaNet``'s."""

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        super().__init__(config, layer_index, rngs=rngs)
        attach_level_weights(self, config, rngs)

    def __call__(self, x: jax.Array, *, positions: jax.Array | None, segment_ids: jax.Array | None = None,
                 cache: LogLinearCache | None = None) -> tuple[jax.Array, LogLinearCache | None]:
        """``[B, T, d_model]`` -> (``[B, T, d_model]``, updated cache or None); arguments as ``GatedDeltaNet``."""
        del positions
        real = None if cache is None or segment_ids is None else segment_ids != 0  # [B, T]
        packed_ids = segment_ids if cache is None else None
        features, conv_states = self._convolved_features(x, cache, packed_ids, real)
        q, k, v = self._split_heads(*features)  # [B, T, H, K], [B, T, H, K], [B, T, H, V]
        log_a, beta = self._gates(x, real)  # [B, T, H] float32
        lam = self.level_weights(x)  # [B, T, H, levels]
        if cache is None:
            out = loglinear_gated_delta_rule(q, k, v, log_a, beta, lam, impl=self.impl, chunk_size=self.chunk_size,
                                             segment_ids=segment_ids)  # [B, T, H, V]
            return self._gated_output(out, x), None
        out, levels, steps = loglinear_prefill(cache["levels"], cache["step"], q, k, v, log_a, beta, lam, real=real,
                                               chunk_size=self.chunk_size)
        return self._gated_output(out, x), {**conv_states, "levels": levels, "step": steps}

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> LogLinearCache:
        """Conv states as ``GatedDeltaNet`` plus ``"levels" [B, H, levels, K, V]`` float32 and ``"step" [B]``."""
        cache = super().init_cache(batch_size, max_length, dtype)
        del cache["state"]
        return {**cache, **level_cache(batch_size, self.num_heads, self.levels, self.key_dim, self.value_dim)}
