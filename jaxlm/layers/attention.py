"""Softmax attention mixer with RoPE, grouped-query heads and a key/value decode cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.embed import dense
from jaxlm.layers.registry import register_mixer
from jaxlm.ops.attention import attention, default_positions
from jaxlm.ops.rope import apply_rope

if TYPE_CHECKING:
    from jaxlm.models.config import ModelConfig

KVCache = dict[str, jax.Array]


@register_mixer("attention")
class Attention(nnx.Module):
    """Multi-head causal self-attention with RoPE (Llama layout; mixer protocol in ``jaxlm.layers.registry``).

    ``q = x Wq``, ``k = x Wk``, ``v = x Wv`` split into H query heads and G kv heads of size D,
    RoPE on q and k, ``o = attention(q, k, v) Wo``. Projections: ``q_proj [d, H*D]``,
    ``k_proj``/``v_proj [d, G*D]``, ``o_proj [H*D, d]``; biases only when ``config.attention_bias``.
    """

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        del layer_index  # every attention layer is the same
        d, head_dim = config.d_model, config.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, head_dim
        self.rope_theta = config.rope_theta
        self.impl = config.attention_impl
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        bias = config.attention_bias
        self.q_proj = dense(config, d, self.num_heads * head_dim, ("embed", "heads"), rngs=rngs, use_bias=bias)
        self.k_proj = dense(config, d, self.num_kv_heads * head_dim, ("embed", "kv_heads"), rngs=rngs, use_bias=bias)
        self.v_proj = dense(config, d, self.num_kv_heads * head_dim, ("embed", "kv_heads"), rngs=rngs, use_bias=bias)
        self.o_proj = dense(config, self.num_heads * head_dim, d, ("heads", "embed"), rngs=rngs, use_bias=bias)

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """``[B, T, d_model]`` -> (``[B, T, d_model]``, updated cache or None).

        ``positions`` ``[B, T]`` (``None``: ``arange(T)`` per row, which lets cuDNN use its causal
        kernel). With a cache, this call's keys/values are written at slots ``positions`` and the
        queries attend over all cache slots under the causal rule ``slot <= position`` (``segment_ids``
        then only mark prefill padding and are not needed).
        """
        batch_size, length, _ = x.shape
        # Head counts come from the projections, so under tensor parallelism (column-split q/k/v, row-split
        # o_proj inside a shard_map) this runs on the local heads and returns this device's partial sum.
        q = self.q_proj(x).reshape(batch_size, length, -1, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).reshape(batch_size, length, -1, self.head_dim)  # [B, T, G, D]
        v = self.v_proj(x).reshape(batch_size, length, -1, self.head_dim)  # [B, T, G, D]
        rope_positions = default_positions(positions, batch_size, length)  # [B, T]
        q = apply_rope(q, rope_positions, self.rope_theta)
        k = apply_rope(k, rope_positions, self.rope_theta)
        if cache is None:
            out = attention(q, k, v, q_positions=positions, kv_positions=positions,
                            q_segment_ids=segment_ids, kv_segment_ids=segment_ids, impl=self.impl)
        else:
            # With a cache, segment_ids only mark right padding of a prefill: a padding slot is overwritten by
            # the real token at that position before any query at or after it attends, so no mask is needed.
            cache = write_kv_cache(cache, k, v, rope_positions)
            slots = default_positions(None, batch_size, cache["k"].shape[1])  # [B, S]
            out = attention(q, cache["k"], cache["v"], q_positions=rope_positions, kv_positions=slots,
                            impl=self.impl)
        out = out.reshape(batch_size, length, -1)  # [B, T, H*D]
        return self.o_proj(out), cache

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> KVCache:
        """Empty cache ``{"k": [B, S, G, D], "v": [B, S, G, D]}`` with ``S = max_length`` (compute dtype by default)."""
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        dtype = self.compute_dtype if dtype is None else dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_kv_cache(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
    """Scatter ``k, v: [B, T, G, D]`` into the cache: ``cache[b, positions[b, t]] = (k, v)[b, t]``.

    Rows may sit at different positions; positions outside ``[0, S)`` are dropped.
    """
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
    slots = jnp.where(positions < 0, cache["k"].shape[1], positions)  # [B, T]; negative -> out of range
    return {
        "k": cache["k"].at[rows, slots].set(k.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[rows, slots].set(v.astype(cache["v"].dtype), mode="drop"),
    }
