"""Mamba-2 mixer (Dao & Gu 2024, §7): input projection, short causal conv, SSD scan, gated RMSNorm, output
projection; its decode cache holds the conv window and the SSD state."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.errors import require
from jaxlm.layers.embed import dense
from jaxlm.layers.registry import register_mixer
from jaxlm.ops.conv import causal_conv1d, causal_conv1d_step
from jaxlm.ops.norms import rms_norm
from jaxlm.ops.ssd import ssd, ssd_step

if TYPE_CHECKING:
    from jaxlm.models.config import ModelConfig

Mamba2Cache = dict[str, jax.Array]

DT_INIT_RANGE = (1e-3, 1e-1)  # softplus(dt_bias) starts log-uniform in this range
A_INIT_RANGE = (1.0, 16.0)  # -A = exp(A_log) starts uniform in this range


@register_mixer("mamba2")
class Mamba2(nnx.Module):
    """Mamba-2 layer (mixer protocol in ``jaxlm.layers.registry``), with inner width ``E = expand·d_model``
    split into ``H = E / P`` heads of size P and ``G`` groups of B/C of size N:

        z, x', B, C, dt = in_proj(u)                      # [E], [E], [G·N], [G·N], [H]
        x', B, C = SiLU(conv(x', B, C))                   # causal depthwise conv of width W
        dt = softplus(dt + dt_bias);  log_a = -exp(A_log)·dt
        o = ssd(q=C, k=B, v=x'·dt, log_a);  y = o + D·x'
        out = out_proj(RMSNorm(y)·SiLU(z))

    ``A_log``, ``dt_bias`` and ``D`` (per head) carry ``no_weight_decay=True``.
    """

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        del layer_index  # every Mamba-2 layer is the same
        options = config.mamba2
        inner = options.expand * config.d_model
        require(inner % options.head_dim == 0, "model.mamba2.head_dim", options.head_dim,
                f"a divisor of the inner width mamba2.expand*d_model={inner}")
        self.num_heads = inner // options.head_dim
        require(self.num_heads % options.num_groups == 0, "model.mamba2.num_groups", options.num_groups,
                f"a divisor of the number of Mamba-2 heads {self.num_heads} (= expand*d_model / head_dim)")
        self.inner, self.head_dim = inner, options.head_dim
        self.num_groups, self.state_dim = options.num_groups, options.state_dim
        self.conv_width, self.chunk_size, self.impl = options.conv_width, options.chunk_size, options.impl
        self.norm_eps = config.norm_eps
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        self.conv_channels = inner + 2 * self.num_groups * self.state_dim
        projected = 2 * inner + 2 * self.num_groups * self.state_dim + self.num_heads
        self.in_proj = dense(config, config.d_model, projected, ("embed", "heads"), rngs=rngs)
        bound = 1.0 / math.sqrt(self.conv_width)  # PyTorch's default for a depthwise conv (fan-in W)
        self.conv_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (self.conv_width, self.conv_channels), jnp.float32, -bound, bound),
            out_sharding=(None, "heads"))
        self.conv_bias = nnx.Param(jnp.zeros((self.conv_channels,), jnp.float32), out_sharding=("heads",))
        self.dt_bias = nnx.Param(initial_dt_bias(rngs.params(), self.num_heads), out_sharding=("heads",),
                                 no_weight_decay=True)
        self.A_log = nnx.Param(initial_a_log(rngs.params(), self.num_heads), out_sharding=("heads",),
                               no_weight_decay=True)
        self.D = nnx.Param(jnp.ones((self.num_heads,), jnp.float32), out_sharding=("heads",), no_weight_decay=True)
        self.norm_scale = nnx.Param(jnp.ones((inner,), jnp.float32), out_sharding=("heads",))
        self.out_proj = dense(config, inner, config.d_model, ("heads", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, *, positions: jax.Array | None, segment_ids: jax.Array | None = None,
                 cache: Mamba2Cache | None = None) -> tuple[jax.Array, Mamba2Cache | None]:
        """``[B, T, d_model]`` -> (``[B, T, d_model]`` in the compute dtype, updated cache or None).

        Without a cache ``segment_ids`` (packed sequences) keep the conv and the scan inside each segment.
        With a cache the T tokens continue the cached state (a prefill, or T = 1 for a decode step) and
        ``segment_ids == 0`` marks right padding, on which the conv window and the SSD state stay unchanged.
        ``positions`` are not needed (the recurrence knows the order).
        """
        del positions
        is_real = None if cache is None or segment_ids is None else segment_ids != 0  # [B, T]
        z, x_heads, q, k, v, log_a, conv_state = self._ssd_inputs(x, segment_ids, cache, is_real)
        out, ssm_state = self._scan(q, k, v, log_a, segment_ids, cache)  # [B, T, H, P]
        new_cache = None if cache is None else {"conv": conv_state, "ssm": ssm_state}
        return self._gated_output(out, x_heads, z), new_cache

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> Mamba2Cache:
        """Empty cache ``{"conv": [B, W-1, E + 2·G·N] (dtype), "ssm": [B, H, N, P] float32}``; its size does not
        depend on ``max_length``."""
        del max_length
        dtype = self.compute_dtype if dtype is None else dtype
        return {
            "conv": jnp.zeros((batch_size, self.conv_width - 1, self.conv_channels), dtype),
            "ssm": jnp.zeros((batch_size, self.num_heads, self.state_dim, self.head_dim), jnp.float32),
        }

    def _ssd_inputs(self, x, segment_ids, cache, is_real):
        """Everything before the scan: ``in_proj``, conv + SiLU, gates and the SSD operands.

        ``x [B, T, d]`` -> ``z [B, T, E]``, ``x' [B, T, H, P]``, ``q = C`` and ``k = B`` ``[B, T, G, N]``,
        ``v = x'·dt [B, T, H, P]`` (compute dtype), ``log_a = −exp(A_log)·softplus(dt + dt_bias) [B, T, H]``
        float32, and the new conv window (None without a cache). On padding (``is_real`` False) ``log_a = 0``
        and ``v = 0``, so the state passes through unchanged.
        """
        batch_size, length, _ = x.shape
        z, xbc, dt_raw = self._split_projection(self.in_proj(x))
        xbc, conv_state = self._conv(xbc, segment_ids, cache, is_real)
        x_inner, b, c = jnp.split(xbc, [self.inner, self.inner + self.num_groups * self.state_dim], axis=-1)
        x_heads = x_inner.reshape(batch_size, length, self.num_heads, self.head_dim)  # [B, T, H, P]
        k = b.reshape(batch_size, length, self.num_groups, self.state_dim)  # [B, T, G, N]
        q = c.reshape(batch_size, length, self.num_groups, self.state_dim)  # [B, T, G, N]
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...])  # [B, T, H]
        log_a = -jnp.exp(self.A_log[...]) * dt  # [B, T, H] float32
        v = x_heads.astype(jnp.float32) * dt[..., None]  # [B, T, H, P]
        if is_real is not None:
            log_a = jnp.where(is_real[..., None], log_a, 0.0)
            v = jnp.where(is_real[..., None, None], v, 0.0)
        return z, x_heads, q, k, v.astype(self.compute_dtype), log_a, conv_state

    def _gated_output(self, out, x_heads, z) -> jax.Array:
        """``out_proj(RMSNorm(o + D·x')·SiLU(z))``: ``o, x' [B, T, H, P]``, ``z [B, T, E]`` -> ``[B, T, d]``."""
        batch_size, length = out.shape[:2]
        y = out.astype(jnp.float32) + self.D[...][:, None] * x_heads.astype(jnp.float32)  # [B, T, H, P]
        y = gated_rms_norm(y.reshape(batch_size, length, self.inner), z, self.norm_scale[...], self.norm_eps)
        return self.out_proj(y.astype(self.compute_dtype))

    def _split_projection(self, projected: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``[B, T, 2E + 2GN + H]`` -> ``z [B, T, E]``, ``xBC [B, T, E + 2GN]``, ``dt [B, T, H]``."""
        z, xbc, dt = jnp.split(projected, [self.inner, self.inner + self.conv_channels], axis=-1)
        return z, xbc, dt

    def _conv(self, xbc, segment_ids, cache, is_real) -> tuple[jax.Array, jax.Array | None]:
        """``SiLU(causal_conv1d(xBC))`` ``[B, T, C]`` and the new conv window (None without a cache)."""
        weight, bias = self.conv_weight[...], self.conv_bias[...]
        if cache is None:
            out, _ = causal_conv1d(xbc, weight, bias, segment_ids=segment_ids)
            return jax.nn.silu(out), None
        if xbc.shape[1] == 1 and is_real is None:
            out, window = causal_conv1d_step(cache["conv"], xbc[:, 0], weight, bias)
            return jax.nn.silu(out[:, None]), window.astype(cache["conv"].dtype)
        out, window = causal_conv1d(xbc, weight, bias, initial_state=cache["conv"])
        if is_real is not None:
            window = last_real_window(cache["conv"], xbc, jnp.sum(is_real, axis=1))
        return jax.nn.silu(out), window.astype(cache["conv"].dtype)

    def _scan(self, q, k, v, log_a, segment_ids, cache) -> tuple[jax.Array, jax.Array | None]:
        """The SSD scan ``[B, T, H, P]``; with a cache, started from and returning the cached state (padding is
        already neutral in ``log_a`` and ``v`` then, so ``segment_ids`` only split packed sequences without one)."""
        if cache is None:
            out = ssd(q, k, v, log_a, impl=self.impl, chunk_size=self.chunk_size, segment_ids=segment_ids)
            return out, None
        if q.shape[1] == 1:
            out, state = ssd_step(cache["ssm"], q[:, 0], k[:, 0], v[:, 0], log_a[:, 0])
            return out[:, None], state
        return ssd(q, k, v, log_a, initial_state=cache["ssm"], return_final_state=True, impl=self.impl,
                   chunk_size=self.chunk_size)


def initial_dt_bias(key: jax.Array, num_heads: int) -> jax.Array:
    """``dt_bias = softplus⁻¹(dt)`` with ``dt`` log-uniform in ``DT_INIT_RANGE`` (Mamba-2 init), ``[H]`` float32.

    ``softplus⁻¹(dt) = dt + log(1 − exp(−dt))``.
    """
    low, high = DT_INIT_RANGE
    dt = jnp.exp(jax.random.uniform(key, (num_heads,), jnp.float32, math.log(low), math.log(high)))  # [H]
    return dt + jnp.log(-jnp.expm1(-dt))


def initial_a_log(key: jax.Array, num_heads: int) -> jax.Array:
    """``A_log = log(A₀)``, ``A₀`` uniform in ``A_INIT_RANGE``, so that ``A = −exp(A_log)``; ``[H]`` float32."""
    return jnp.log(jax.random.uniform(key, (num_heads,), jnp.float32, *A_INIT_RANGE))


def gated_rms_norm(y: jax.Array, z: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Mamba-2's output gate ``RMSNorm(y)·SiLU(z)`` over the inner width: ``[B, T, E]`` -> ``[B, T, E]`` float32."""
    return rms_norm(y.astype(jnp.float32), scale, eps) * jax.nn.silu(z.astype(jnp.float32))


def last_real_window(conv_state: jax.Array, x: jax.Array, num_real: jax.Array) -> jax.Array:
    """The conv window after each row's last real token: ``concat(conv_state, x)[b, n_b : n_b + W-1]``.

    ``conv_state [B, W-1, C]``, ``x [B, T, C]`` (right-padded rows), ``num_real [B]`` real tokens per row
    -> ``[B, W-1, C]`` (unchanged for a row without real tokens).
    """
    window = conv_state.shape[1]
    history = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    take = num_real[:, None] + jnp.arange(window)[None, :]  # [B, W-1]
    return jnp.take_along_axis(history, take[..., None], axis=1)
