"""PaTH attention mixer (Yang et al. 2025): softmax attention whose positions come from data-dependent
Householder transformations instead of RoPE, with the optional forget gate of PaTH-FoX; and the Forgetting
Transformer's attention (FoX, Lin et al. 2025), which is the same layer without Householders."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.embed import dense
from jaxlm.layers.registry import register_mixer
from jaxlm.ops.conv import causal_conv1d, causal_conv1d_step
from jaxlm.ops.path import path_attention, path_decode_step, path_prefill_keys

if TYPE_CHECKING:
    from jaxlm.models.config import ModelConfig

PaTHCache = dict[str, jax.Array]
DIRECTION_NORM_EPS = 1e-6


@register_mixer("path")
class PaTHAttention(nnx.Module):
    """Grouped-query PaTH attention (mixer protocol in ``jaxlm.layers.registry``), paper section 3.

    ``q = x Wq`` (H heads), ``k = x Wk``, ``v = x Wv`` (G kv heads) of size D, no RoPE;
    per kv head ``β_t = 2·sigmoid(x_t Wβ + bβ) ∈ (0, 2)`` and ``w_t = L2norm(SiLU(conv(x_t W_w1 W_w2)))``
    (rank ``config.path.low_rank``, causal depthwise conv of width ``config.path.conv_width``), float32;
    with ``config.path.forget_gate`` per query head ``log_f_t = logsigmoid(x_t Wf + bf)``;
    ``o = path_attention(q, k, v, w, β, log_f) Wo``. With ``config.path.householder`` False there are no
    w/β projections and ``β = 0`` (every ``H_t = I``): softmax attention with no position encoding, plus
    the forget gate when it is on (``ForgettingAttention``).

    Decode cache: ``k [B, S, G, D]`` float32 keys already carried through every Householder so far (they
    are rewritten each step, so they stay float32), ``v [B, S, G, D]``, ``w_conv [B, W-1, G·D]`` float32
    conv state of the direction branch (only with Householders), ``length [B]`` int32 and, with the gate,
    ``cum_log_f [B, S, H]`` float32 (``G_j`` per slot). A multi-token call with a cache is a prefill into an empty cache
    (``segment_ids`` 0 marks right padding, whose Householders and gates are left out); a one-token call
    is a decode step at slot ``length``.
    """

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        del layer_index  # every PaTH layer is the same
        options = config.path
        d, head_dim = config.d_model, config.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, head_dim
        self.impl, self.block_size, self.forget_gate = options.impl, options.block_size, options.forget_gate
        self.householder = options.householder
        self.compute_dtype = jnp.dtype(config.compute_dtype)
        bias = config.attention_bias
        kv_width = self.num_kv_heads * head_dim
        self.q_proj = dense(config, d, self.num_heads * head_dim, ("embed", "heads"), rngs=rngs, use_bias=bias)
        self.k_proj = dense(config, d, kv_width, ("embed", "kv_heads"), rngs=rngs, use_bias=bias)
        self.v_proj = dense(config, d, kv_width, ("embed", "kv_heads"), rngs=rngs, use_bias=bias)
        self.o_proj = dense(config, self.num_heads * head_dim, d, ("heads", "embed"), rngs=rngs, use_bias=bias)
        if self.householder:
            self.beta_proj = dense(config, d, self.num_kv_heads, ("embed", "kv_heads"), rngs=rngs, use_bias=True)
            self.direction_down = dense(config, d, options.low_rank, ("embed", None), rngs=rngs)
            self.direction_up = dense(config, options.low_rank, kv_width, (None, "kv_heads"), rngs=rngs)
            conv_init = nnx.with_partitioning(_symmetric_uniform(options.conv_width ** -0.5), (None, "kv_heads"))
            self.direction_conv = nnx.Param(conv_init(rngs.params(), (options.conv_width, kv_width), jnp.float32))
        if self.forget_gate:
            self.forget_proj = dense(config, d, self.num_heads, ("embed", "heads"), rngs=rngs, use_bias=True)

    def __call__(self, x: jax.Array, *, positions: jax.Array | None, segment_ids: jax.Array | None = None,
                 cache: PaTHCache | None = None) -> tuple[jax.Array, PaTHCache | None]:
        """``[B, T, d_model]`` -> (``[B, T, d_model]``, updated cache or None). ``positions`` are not used:
        PaTH encodes order through its Householders (a cache tracks each row's length itself)."""
        del positions
        batch_size, length, _ = x.shape
        q = self.q_proj(x).reshape(batch_size, length, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).reshape(batch_size, length, self.num_kv_heads, self.head_dim)  # [B, T, G, D]
        v = self.v_proj(x).reshape(batch_size, length, self.num_kv_heads, self.head_dim)  # [B, T, G, D]
        log_f = jax.nn.log_sigmoid(self.forget_proj(x).astype(jnp.float32)) if self.forget_gate else None  # [B, T, H]
        if self.householder:
            beta = 2.0 * jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))  # [B, T, G]
            direction_inputs = self.direction_up(self.direction_down(x)).astype(jnp.float32)  # [B, T, G*D]
        else:  # every H_t = I: no direction branch at all
            beta = jnp.zeros((batch_size, length, self.num_kv_heads), jnp.float32)  # [B, T, G]
            direction_inputs = None
        if cache is None:
            w = self.directions(direction_inputs, segment_ids=segment_ids, like=k)  # [B, T, G, D]
            out = path_attention(q, k, v, w, beta, log_f, impl=self.impl, block_size=self.block_size,
                                 segment_ids=segment_ids)
        elif length == 1:
            out, cache = self.decode_step(q, k, v, direction_inputs, beta, log_f, cache)
        else:
            out, cache = self.prefill(q, k, v, direction_inputs, beta, log_f, segment_ids, cache)
        out = out.reshape(batch_size, length, self.num_heads * self.head_dim)  # [B, T, H*D]
        return self.o_proj(out), cache

    def directions(self, direction_inputs: jax.Array | None, initial_state: jax.Array | None = None,
                   segment_ids: jax.Array | None = None, like: jax.Array | None = None) -> jax.Array:
        """``w = L2norm(SiLU(conv(u)))`` per kv head: ``u [B, T, G*D]`` float32 -> ``[B, T, G, D]`` float32.
        Without Householders (``u`` None) ``w = 0`` shaped like the keys ``like [B, T, G, D]`` (β = 0 too)."""
        if direction_inputs is None:
            return jnp.zeros(like.shape, jnp.float32)
        convolved, _ = causal_conv1d(direction_inputs, self.direction_conv[...], initial_state=initial_state,
                                     segment_ids=segment_ids)  # [B, T, G*D]
        return self.unit_directions(convolved)

    def unit_directions(self, convolved: jax.Array) -> jax.Array:
        """``L2norm(SiLU(c))`` per kv head: ``[..., G*D]`` -> ``[..., G, D]`` float32."""
        activated = jax.nn.silu(convolved.astype(jnp.float32))
        activated = activated.reshape(*activated.shape[:-1], self.num_kv_heads, self.head_dim)
        squared_norm = jnp.sum(jnp.square(activated), axis=-1, keepdims=True)
        return activated * jax.lax.rsqrt(squared_norm + DIRECTION_NORM_EPS)

    def prefill(self, q, k, v, direction_inputs, beta, log_f, segment_ids, cache):
        """Attend within the right-padded prompt and fill an empty cache: keys carried through the
        Householders of every real token (``path_prefill_keys``, padding given β = 0), values, ``G_j``,
        the conv state after each row's last real token, and the row lengths."""
        batch_size, length = q.shape[:2]
        num_slots = cache["k"].shape[1]
        if length > num_slots:
            raise ValueError(f"PaTH prefill of {length} tokens does not fit a cache of {num_slots} slots")
        real = jnp.ones((batch_size, length), bool) if segment_ids is None else segment_ids != 0  # [B, T]
        beta = jnp.where(real[..., None], beta, 0.0)  # padding: H = I
        w = self.directions(direction_inputs, initial_state=cache.get("w_conv"), like=k)  # [B, T, G, D]
        out = path_attention(q, k, v, w, beta, log_f, impl=self.impl, block_size=self.block_size)
        lengths = real.sum(axis=1).astype(jnp.int32)  # [B]
        if self.householder:
            keys = path_prefill_keys(k, w, beta, block_size=self.block_size)  # [B, T, G, D]
        else:
            keys = k  # no Householder ever moves a key
        new_cache = dict(cache)
        new_cache["k"] = cache["k"].at[:, :length].set(keys.astype(cache["k"].dtype))
        new_cache["v"] = cache["v"].at[:, :length].set(v.astype(cache["v"].dtype))
        if self.householder:
            new_cache["w_conv"] = conv_state_after(cache["w_conv"], direction_inputs, lengths)
        new_cache["length"] = lengths
        if log_f is not None:
            gate = jnp.cumsum(jnp.where(real[..., None], log_f, 0.0), axis=1)  # G_t  [B, T, H]
            new_cache["cum_log_f"] = cache["cum_log_f"].at[:, :length].set(gate)
        return out, new_cache

    def decode_step(self, q, k, v, direction_inputs, beta, log_f, cache):
        """One token per row (``T = 1``): move the cached keys past ``H_t``, append, attend."""
        new_cache = {}
        if self.householder:
            convolved, new_cache["w_conv"] = causal_conv1d_step(cache["w_conv"], direction_inputs[:, 0],
                                                                self.direction_conv[...])  # [B, G*D]
            w_t = self.unit_directions(convolved)  # [B, G, D]
        else:
            w_t = jnp.zeros(k[:, 0].shape, jnp.float32)  # [B, G, D] with β = 0: H_t = I
        log_f_t = None if log_f is None else log_f[:, 0]
        out, (keys, values, lengths, cum_log_f) = path_decode_step(
            cache["k"], cache["v"], cache["length"], q[:, 0], k[:, 0], v[:, 0], w_t, beta[:, 0], log_f_t,
            cache.get("cum_log_f"))
        new_cache.update(k=keys, v=values, length=lengths)
        if cum_log_f is not None:
            new_cache["cum_log_f"] = cum_log_f
        return out[:, None], new_cache

    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype | None = None) -> PaTHCache:
        """Empty cache (class docstring); values in ``dtype`` (compute dtype by default), the rest float32."""
        dtype = self.compute_dtype if dtype is None else dtype
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        cache = {
            "k": jnp.zeros(shape, jnp.float32),
            "v": jnp.zeros(shape, dtype),
            "length": jnp.zeros((batch_size,), jnp.int32),
        }
        if self.householder:
            width = self.direction_conv.shape[0]
            cache["w_conv"] = jnp.zeros((batch_size, width - 1, self.num_kv_heads * self.head_dim), jnp.float32)
        if self.forget_gate:
            cache["cum_log_f"] = jnp.zeros((batch_size, max_length, self.num_heads), jnp.float32)
        return cache


@register_mixer("fox")
class ForgettingAttention(PaTHAttention):
    """Forgetting Attention (Lin et al. 2025, "Forgetting Transformer", section 2): grouped-query softmax
    attention with no position encoding and a data-dependent forget gate per query head,

        f_t = sigmoid(x_t Wf + bf),   G_t = Σ_{s≤t} log f_s,
        o_i = Σ_{j≤i} softmax_j(scale·q_iᵀ k_j + G_i − G_j) v_j,

    i.e. PaTH-FoX with every Householder the identity (β = 0): ``config.path`` with ``householder=False``
    and ``forget_gate=True`` whatever it says (its ``impl`` and ``block_size`` still apply). Decode cache
    as ``PaTHAttention`` without the direction conv state."""

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        options = dataclasses.replace(config.path, householder=False, forget_gate=True)
        super().__init__(dataclasses.replace(config, path=options), layer_index, rngs=rngs)


def conv_state_after(initial_state: jax.Array, inputs: jax.Array, lengths: jax.Array) -> jax.Array:
    """The conv state after each row's first ``lengths[b]`` inputs: the last ``W-1`` of
    ``concat(initial_state, inputs[:lengths])``. ``initial_state [B, W-1, C]``, ``inputs [B, T, C]``."""
    history = jnp.concatenate([initial_state.astype(inputs.dtype), inputs], axis=1)  # [B, W-1+T, C]
    offsets = lengths[:, None] + jnp.arange(initial_state.shape[1])[None, :]  # [B, W-1]
    return jnp.take_along_axis(history, offsets[..., None], axis=1)


def _symmetric_uniform(bound: float):
    """Initializer drawing uniformly from ``[-bound, bound)`` (the depthwise conv's fan-in rule)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
