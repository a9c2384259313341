"""Gated DeltaNet mixer (Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks", §3.3 and Fig. 1) with a
recurrent decode cache."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.embed import dense
from jaxlm.layers.registry import register_mixer
from jaxlm.ops.conv import causal_conv1d
from jaxlm.ops.delta_rule import gated_delta_rule, gated_delta_rule_step
from jaxlm.ops.norms import rms_norm

if TYPE_CHECKING:
    from jaxlm.models.config import ModelConfig

GDNCache = dict[str, jax.Array]
CONV_INPUTS = ("q", "k", "v")
L2_NORM_EPS = 1e-6
# Initial ranges of the decay rate A = exp(A_log) and of the step dt = softplus(W_a x + dt_bias) (Mamba-2 recipe).
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)
DT_INIT_FLOOR = 1e-4


@register_mixer("gated_deltanet")
class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet layer (mixer protocol in ``jaxlm.layers.registry``), H heads, keys K, values V:

        q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))    (short causal convs, per channel)
        q = K^{-1/2} q / ‖q‖,  k = k / ‖k‖                                    (per head, float32)
        log_a = −exp(A_log) · softplus(x W_a + dt_bias),  β = sigmoid(x W_b)
        o = gated_delta_rule(q, k, v, log_a, β)                              (jaxlm.ops.delta_rule)
        y = (RMSNorm_V(o) · SiLU(x W_g)) W_out                                 (RMSNorm per head over V)

    Parameters: ``q_proj``, ``k_proj [d, H*K]``, ``v_proj``, ``g_proj [d, H*V]``, ``a_proj``, ``b_proj [d, H]``,
    ``out_proj [H*V, d]``, conv weights ``q_conv``, ``k_conv [W, H*K]``, ``v_conv [W, H*V]``, ``A_log``,
    ``dt_bias [H]`` (no weight decay) and ``o_norm [V]``. ``positions`` are not used (no position encoding).
    """

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        del layer_index  # every Gated DeltaNet layer is the same
        options = config.gated_deltanet
        d = config.d_model
        self.num_heads = options.num_heads or config.num_heads
        self.key_dim = options.key_dim or config.resolved_head_dim
        self.value_dim = options.value_dim or self.key_dim
        self.conv_width = options.conv_width
        self.chunk_size, self.impl = options.chunk_size, options.impl
        self.norm_eps = config.norm_eps
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        keys_width, values_width = self.num_heads * self.key_dim, self.num_heads * self.value_dim
        self.q_proj = dense(config, d, keys_width, ("embed", "heads"), rngs=rngs)
        self.k_proj = dense(config, d, keys_width, ("embed", "heads"), rngs=rngs)
        self.v_proj = dense(config, d, values_width, ("embed", "heads"), rngs=rngs)
        self.g_proj = dense(config, d, values_width, ("embed", "heads"), rngs=rngs)
        self.a_proj = dense(config, d, self.num_heads, ("embed", None), rngs=rngs)
        self.b_proj = dense(config, d, self.num_heads, ("embed", None), rngs=rngs)
        self.out_proj = dense(config, values_width, d, ("heads", "embed"), rngs=rngs)
        self.q_conv = _conv_weight(self.conv_width, keys_width, rngs)
        self.k_conv = _conv_weight(self.conv_width, keys_width, rngs)
        self.v_conv = _conv_weight(self.conv_width, values_width, rngs)
        self.A_log = _head_param(_init_a_log, self.num_heads, rngs)
        self.dt_bias = _head_param(_init_dt_bias, self.num_heads, rngs)
        norm_init = nnx.with_partitioning(nnx.initializers.ones_init(), ("head_dim",))
        self.o_norm = nnx.Param(norm_init(rngs.params(), (self.value_dim,), jnp.float32))

    def __call__(self, x: jax.Array, *, positions: jax.Array | None, segment_ids: jax.Array | None = None,
                 cache: GDNCache | None = None) -> tuple[jax.Array, GDNCache | None]:
        """``[B, T, d_model]`` -> (``[B, T, d_model]``, updated cache or None).

        Without a cache, ``segment_ids`` (packed sequences) reset the convs and the state at segment starts.
        With a cache, the T tokens continue the cached state (prefill or one decode step) and tokens with
        ``segment_ids == 0`` (right padding of a prefill) leave the state and the conv states unchanged.
        """
        del positions
        batch_size, length, _ = x.shape
        real = None if cache is None or segment_ids is None else segment_ids != 0  # [B, T]
        packed_ids = segment_ids if cache is None else None
        features, conv_states = self._convolved_features(x, cache, packed_ids, real)
        q, k, v = self._split_heads(*features)
        log_a, beta = self._gates(x, real)  # [B, T, H] float32
        if cache is None:
            out = gated_delta_rule(q, k, v, log_a, beta, impl=self.impl, chunk_size=self.chunk_size,
                                   segment_ids=segment_ids)  # [B, T, H, V]
            return self._gated_output(out, x), None
        if length == 1:
            out, state = gated_delta_rule_step(cache["state"], q[:, 0], k[:, 0], v[:, 0], log_a[:, 0], beta[:, 0])
            out = out[:, None]  # [B, 1, H, V]
        else:
            out, state = gated_delta_rule(q, k, v, log_a, beta, initial_state=cache["state"],
                                          return_final_state=True, impl=self.impl, chunk_size=self.chunk_size)
        return self._gated_output(out, x), {**conv_states, "state": state}

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> GDNCache:
        """Empty cache: conv states ``"q_conv", "k_conv" [B, W-1, H*K]``, ``"v_conv" [B, W-1, H*V]`` (compute
        dtype by default) and ``"state" [B, H, K, V]`` float32. ``max_length`` is not needed (constant size)."""
        del max_length
        dtype = self.compute_dtype if dtype is None else dtype
        widths = {"q": self.num_heads * self.key_dim, "k": self.num_heads * self.key_dim,
                  "v": self.num_heads * self.value_dim}
        cache = {f"{name}_conv": jnp.zeros((batch_size, self.conv_width - 1, widths[name]), dtype)
                 for name in CONV_INPUTS}
        cache["state"] = jnp.zeros((batch_size, self.num_heads, self.key_dim, self.value_dim), jnp.float32)
        return cache

    def _convolved_features(self, x, cache, segment_ids, real) -> tuple[tuple[jax.Array, ...], GDNCache]:
        """``SiLU(conv(x W))`` for q, k, v (``[B, T, H*K]``, ``[B, T, H*K]``, ``[B, T, H*V]``) and, with a cache,
        the new conv states: the last ``W-1`` inputs up to each row's last real token."""
        features, conv_states = [], {}
        for name in CONV_INPUTS:
            projected = getattr(self, f"{name}_proj")(x)  # [B, T, C]
            previous = None if cache is None else cache[f"{name}_conv"]  # [B, W-1, C]
            convolved, _ = causal_conv1d(projected, getattr(self, f"{name}_conv")[...], initial_state=previous,
                                         segment_ids=segment_ids)
            features.append(jax.nn.silu(convolved))
            if cache is not None:
                conv_states[f"{name}_conv"] = conv_state_after_real_tokens(previous, projected, real)
        return tuple(features), conv_states

    def _split_heads(self, q, k, v) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Heads, with ``q = K^{-1/2} q/‖q‖`` and ``k = k/‖k‖`` (float32) -> ``[B, T, H, K]``, ``[B, T, H, K]``,
        ``[B, T, H, V]``."""
        batch_size, length, _ = q.shape
        q = q.reshape(batch_size, length, self.num_heads, self.key_dim)
        k = k.reshape(batch_size, length, self.num_heads, self.key_dim)
        v = v.reshape(batch_size, length, self.num_heads, self.value_dim)
        return l2_normalize(q) / math.sqrt(self.key_dim), l2_normalize(k), v

    def _gates(self, x, real) -> tuple[jax.Array, jax.Array]:
        """``log_a = −exp(A_log)·softplus(x W_a + dt_bias)``, ``β = sigmoid(x W_b)``, ``[B, T, H]`` float32;
        both 0 where ``real`` is False (padding leaves the state unchanged)."""
        dt = jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])  # [B, T, H]
        log_a = -jnp.exp(self.A_log[...]) * dt
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))  # [B, T, H]
        if real is not None:
            log_a, beta = jnp.where(real[..., None], log_a, 0.0), jnp.where(real[..., None], beta, 0.0)
        return log_a, beta

    def _gated_output(self, out, x) -> jax.Array:
        """``(RMSNorm_V(o) · SiLU(x W_g)) W_out``: ``o [B, T, H, V]`` -> ``[B, T, d_model]``."""
        batch_size, length = out.shape[:2]
        gate = self.g_proj(x).reshape(batch_size, length, self.num_heads, self.value_dim)  # [B, T, H, V]
        normed = rms_norm(out.astype(self.compute_dtype), self.o_norm[...], self.norm_eps)  # [B, T, H, V]
        gated = normed * jax.nn.silu(gate)
        return self.out_proj(gated.reshape(batch_size, length, self.num_heads * self.value_dim))


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / sqrt(Σ x² + eps)`` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + L2_NORM_EPS)


def conv_state_after_real_tokens(previous: jax.Array, inputs: jax.Array, real: jax.Array | None) -> jax.Array:
    """The conv state after each row's real tokens: ``window[b, n_b : n_b + W-1]`` of
    ``window = concat(previous, inputs)`` with ``n_b`` the row's number of real (left-aligned) tokens.

    ``previous [B, W-1, C]``, ``inputs [B, T, C]``, ``real [B, T]`` bool (None: all real) -> ``[B, W-1, C]``.
    """
    batch_size, length, _ = inputs.shape
    window = jnp.concatenate([previous, inputs.astype(previous.dtype)], axis=1)  # [B, W-1+T, C]
    num_real = jnp.full((batch_size,), length) if real is None else jnp.sum(real, axis=1)  # [B]
    rows = num_real[:, None] + jnp.arange(previous.shape[1])  # [B, W-1]
    return jnp.take_along_axis(window, rows[..., None], axis=1)


def _conv_weight(width: int, channels: int, rngs: nnx.Rngs) -> nnx.Param:
    """Depthwise conv weight ``[W, C]`` ~ U(−W^{-1/2}, W^{-1/2}) (the fan-in rule of a depthwise conv)."""
    bound = 1.0 / math.sqrt(width)

    def uniform(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    init = nnx.with_partitioning(uniform, (None, "heads"))
    return nnx.Param(init(rngs.params(), (width, channels), jnp.float32))


def _init_a_log(key: jax.Array, num_heads: int) -> jax.Array:
    """``A_log = log A`` with ``A ~ U(1, 16)`` per head."""
    return jnp.log(jax.random.uniform(key, (num_heads,), jnp.float32, *A_INIT_RANGE))


def _init_dt_bias(key: jax.Array, num_heads: int) -> jax.Array:
    """``dt_bias = softplus⁻¹(dt) = dt + log(−expm1(−dt))`` with ``dt`` log-uniform in ``DT_INIT_RANGE``."""
    low, high = math.log(DT_INIT_RANGE[0]), math.log(DT_INIT_RANGE[1])
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, (num_heads,), jnp.float32, low, high)), DT_INIT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))


def _head_param(init_fn, num_heads: int, rngs: nnx.Rngs) -> nnx.Param:
    """A float32 ``[H]`` parameter from ``init_fn(key, H)``, replicated and exempt from weight decay."""
    init = nnx.with_partitioning(lambda key, shape, dtype: init_fn(key, shape[0]).astype(dtype), (None,))
    return nnx.Param(init(rngs.params(), (num_heads,), jnp.float32), no_weight_decay=True)
