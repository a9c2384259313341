"""Log-linear attention over SSD (Mamba-2) and Gated DeltaNet (Guo, Yang, Goel, Xing, Dao, Kim 2025).

For query t and key s <= t (positions counted from the start of the segment)::

    o_t = Σ_{s<=t} λ_t^{level(t,s)} · (q_tᵀ A_t A_{t-1} … A_{s+1} β_s k_s) v_s
    level(t, s) = 0 if s == t else 1 + floor(log2(t XOR s))       (fenwick.fenwick_level)

with ``A_r = a_r I`` and ``β ≡ 1`` for log-linear SSD, ``A_r = a_r (I − β_r k_r k_rᵀ)`` for log-linear
Gated DeltaNet, ``a_r = exp(log_a_r)``. λ multiplies each final (t, s) entry. λ ≡ 1 gives the base op.

Shapes: ``q, k: [B, T, G, K]``, ``v: [B, T, H, V]`` (head h reads group ``h // (H // G)``),
``log_a, beta: [B, T, H]``, ``lam: [B, T, H, L]`` with ``L >= num_levels(T) = ceil(log2 T) + 1`` (extra
columns are ignored). Implementations: ``"recurrent"`` (a scan over time carrying the Fenwick level stack
``[B, H, L, K, V]`` float32, the readable reference), ``"chunked"`` (``loglinear_chunks``, O(T log T)),
``"pallas"`` (``pallas_kernels.loglinear`` for log-linear SSD, ``pallas_kernels.loglinear_gdn`` for log-linear
Gated DeltaNet: Pallas forward and backward kernels with the Fenwick levels fused into one sequential pass over
the chunks in each direction, interpret mode on CPU; the kernels choose their own chunk per backend; no segment
ids), ``"auto"`` (the kernels on a GPU when they take the inputs, chunked otherwise, e.g. with segment ids:
``pallas_kernels.registry.kernels_unless_unsupported``). The decode steps update the level stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxlm.ops.fenwick import fenwick_level, merge_levels, num_levels, segment_positions
from jaxlm.ops.delta_rule import gated_delta_rule
from jaxlm.ops.loglinear_chunks import chunked_loglinear
from jaxlm.ops.ssd import ssd
from pallas_kernels.registry import kernels_unless_unsupported

LOGLINEAR_IMPLS = ("recurrent", "chunked", "auto", "pallas")


def loglinear_ssd(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, lam: jax.Array, *,
                  impl: str = "chunked", chunk_size: int = 64, segment_ids: jax.Array | None = None) -> jax.Array:
    """Log-linear Mamba-2: ``o_t = Σ_{s<=t} λ_t^{level(t,s)} exp(Σ_{r=s+1..t} log_a_r) (q_t·k_s) v_s``
    (Guo et al. 2025, section 3.1, ``O = (Q Kᵀ ⊙ M^S ⊙ M^H) V``).

    ``segment_ids: [B, T]`` (packed sequences): tokens only see keys of their segment and positions restart
    at 0 at every segment start. Returns ``[B, T, H, V]`` in ``v``'s dtype (float32 accumulation).
    """
    return _loglinear("loglinear_ssd", q, k, v, log_a, None, lam, impl, chunk_size, segment_ids)


def loglinear_gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array,
                               lam: jax.Array, *, impl: str = "chunked", chunk_size: int = 64,
                               segment_ids: jax.Array | None = None) -> jax.Array:
    """Log-linear Gated DeltaNet: ``o_t = Σ_{s<=t} λ_t^{level(t,s)} (q_tᵀ A_t … A_{s+1} β_s k_s) v_s`` with
    ``A_r = a_r (I − β_r k_r k_rᵀ)`` (Guo et al. 2025, section 3.3); λ weights final entries, never the
    UT inverse. Arguments as ``loglinear_ssd`` plus ``beta: [B, T, H]``.
    """
    return _loglinear("loglinear_gated_delta_rule", q, k, v, log_a, beta, lam, impl, chunk_size, segment_ids)


def loglinear_ssd_step(levels: jax.Array, t: jax.Array, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array,
                       log_a_t: jax.Array, lam_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decode step of log-linear SSD on the Fenwick level stack (Guo et al. 2025, section 3.3).

    Binary-counter carry (``fenwick.merge_levels``: levels ``0 … lssb(t)`` merge into ``lssb(t)+1``; ``t == 0``
    clears the stack), then ``S^{(ℓ)} ← a_t S^{(ℓ)}`` for every level, ``S^{(0)} += k_t v_tᵀ``, and
    ``o_t = Σ_ℓ λ_t^{(ℓ)} S^{(ℓ)ᵀ} q_t``.

    ``levels: [B, H, L, K, V]`` float32, ``t: [B]`` (or scalar) int position of this token,
    ``q_t, k_t: [B, G, K]``, ``v_t: [B, H, V]``, ``log_a_t: [B, H]``, ``lam_t: [B, H, L' >= L]``.
    Returns (``o_t [B, H, V]`` in ``v_t``'s dtype, new levels). Exact while ``t < 2^{L-1}``.
    """
    return _loglinear_step(levels, t, q_t, k_t, v_t, log_a_t, None, lam_t)


def loglinear_gated_delta_rule_step(levels: jax.Array, t: jax.Array, q_t: jax.Array, k_t: jax.Array,
                                    v_t: jax.Array, log_a_t: jax.Array, beta_t: jax.Array,
                                    lam_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decode step of log-linear Gated DeltaNet: the carry of ``loglinear_ssd_step``, then
    ``S^{(ℓ)} ← a_t (I − β_t k_t k_tᵀ) S^{(ℓ)}`` for every level, ``S^{(0)} += β_t k_t v_tᵀ``,
    ``o_t = Σ_ℓ λ_t^{(ℓ)} S^{(ℓ)ᵀ} q_t``. ``beta_t: [B, H]``; other arguments as ``loglinear_ssd_step``.
    """
    return _loglinear_step(levels, t, q_t, k_t, v_t, log_a_t, beta_t, lam_t)


def init_level_stack(batch_size: int, num_heads: int, levels: int, key_dim: int, value_dim: int) -> jax.Array:
    """An empty decode level stack ``[B, H, L, K, V]`` float32."""
    return jnp.zeros((batch_size, num_heads, levels, key_dim, value_dim), jnp.float32)


def _loglinear_step(levels, t, q_t, k_t, v_t, log_a_t, beta_t, lam_t):
    """Shared decode step; ``beta_t is None`` selects SSD (``A = a I``, ``β = 1``)."""
    batch, heads, num_stack_levels = levels.shape[:3]
    if lam_t.shape[-1] < num_stack_levels:
        raise ValueError(f"lam_t has {lam_t.shape[-1]} level columns but the level stack has {num_stack_levels}; "
                         f"lam_t must have at least {num_stack_levels}")
    q = _expand_groups(q_t, heads, axis=1).astype(jnp.float32)  # [B, H, K]
    k = _expand_groups(k_t, heads, axis=1).astype(jnp.float32)  # [B, H, K]
    v = v_t.astype(jnp.float32)  # [B, H, V]
    decay = jnp.exp(log_a_t.astype(jnp.float32))  # [B, H]
    beta = jnp.ones_like(decay) if beta_t is None else beta_t.astype(jnp.float32)  # [B, H]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (batch,))
    levels = merge_levels(levels.astype(jnp.float32), t)  # [B, H, L, K, V]
    if beta_t is not None:  # (I − β k kᵀ) S
        key_readout = jnp.einsum("bhk,bhlkv->bhlv", k, levels)  # [B, H, L, V]
        levels = levels - beta[:, :, None, None, None] * k[:, :, None, :, None] * key_readout[:, :, :, None, :]
    levels = levels * decay[:, :, None, None, None]
    write = (beta[..., None] * k)[..., :, None] * v[..., None, :]  # [B, H, K, V]
    levels = levels.at[:, :, 0].add(write)
    lam = lam_t[..., :num_stack_levels].astype(jnp.float32)  # [B, H, L]
    out = jnp.einsum("bhl,bhlkv,bhk->bhv", lam, levels, q)  # [B, H, V]
    return out.astype(v_t.dtype), levels


def loglinear_prefill(levels: jax.Array, steps: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                      log_a: jax.Array, beta: jax.Array | None, lam: jax.Array,
                      real: jax.Array | None = None, chunk_size: int = 64) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Continue a decode level stack over T tokens: the decode step applied at every real token.

    ``levels [B, H, L, K, V]`` float32 and ``steps [B]`` int32 (tokens already seen per row) come from the
    cache; ``q, k: [B, T, G, K]``, ``v: [B, T, H, V]``, ``log_a, beta: [B, T, H]`` (``beta=None``: SSD),
    ``lam: [B, T, H, L' >= L]``, ``real: [B, T]`` bool (False: right padding, which leaves the stack and the
    step counter unchanged). Returns (``o [B, T, H, V]`` in ``v``'s dtype, new levels, new steps).

    A prompt prefill (every row's stack empty, real tokens a prefix of each row, and ``L >= num_levels(T)``
    so that no level is clamped) runs the chunked op and builds the final stack with
    ``level_stack_after_prefix``; anything else (a continued prefill, holes in ``real``, a clamped stack)
    scans the decode step over time. Both compute the same function.
    """
    if lam.shape[-1] < levels.shape[2]:
        raise ValueError(f"lam has {lam.shape[-1]} level columns but the level stack has {levels.shape[2]}; "
                         f"lam must have at least {levels.shape[2]} (model.loglinear.num_levels)")
    real = jnp.ones(v.shape[:2], bool) if real is None else real.astype(bool)
    num_real = jnp.sum(real, axis=1, dtype=jnp.int32)  # [B]
    positions = steps[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1  # [B, T]
    is_prefix = real == (jnp.arange(v.shape[1])[None, :] < num_real[:, None])  # [B, T]
    fresh_prompt = jnp.all(steps == 0) & jnp.all(is_prefix)

    def chunked_prefill():
        keep = real[..., None]  # [B, T, 1]: padding neither decays, rotates nor writes
        out = _loglinear("loglinear_prefill", q, k, v, jnp.where(keep, log_a, 0.0),
                         None if beta is None else jnp.where(keep, beta, 0.0), lam, "chunked", chunk_size, None)
        stack = level_stack_after_prefix(k, jnp.where(keep[..., None], v, 0), jnp.where(keep, log_a, 0.0),
                                         None if beta is None else jnp.where(keep, beta, 0.0), num_real,
                                         levels.shape[2], chunk_size)
        return out, stack

    def scanned_prefill():
        return _scan_steps(levels, positions, real, q, k, v, log_a, beta, lam)

    if levels.shape[2] < num_levels(v.shape[1]):
        out, levels = scanned_prefill()
    else:
        out, levels = lax.cond(fresh_prompt, chunked_prefill, scanned_prefill)
    return out.astype(v.dtype), levels, steps + num_real


def level_stack_after_prefix(k: jax.Array, v: jax.Array, log_a: jax.Array, beta: jax.Array | None,
                             num_real: jax.Array, num_stack_levels: int, chunk_size: int = 64) -> jax.Array:
    """The decode level stack after the first ``n_b`` tokens of each row, by the chunked base op.

    For the last token ``t = n − 1``, level ℓ holds the keys ``s`` with ``level(t, s) = ℓ`` (the last level
    also every older key, as ``merge_levels`` clamps), carried to ``t``:
    ``S^{(ℓ)} = Σ_{s ∈ ℓ} A_t … A_{s+1} β_s k_s v_sᵀ``. Starting from zero and writing only level ℓ's values,
    the base op (``ssd`` / ``gated_delta_rule``) ends exactly in ``S^{(ℓ)}``: the transitions before the
    level act on zero and those after it carry it to ``t``. Padding after ``n`` must be neutral
    (``log_a = 0``, ``β = 0``, ``v = 0``).

    ``k: [B, T, G, K]``, ``v: [B, T, H, V]``, ``log_a, beta: [B, T, H]``, ``num_real: [B]`` (>= 1) ->
    ``[B, H, L, K, V]`` float32.
    """
    batch, length = v.shape[:2]
    last = jnp.maximum(num_real - 1, 0)  # [B]
    key_positions = jnp.arange(length, dtype=jnp.int32)  # [T]
    level_of_key = jnp.minimum(fenwick_level(last[:, None], key_positions[None, :]), num_stack_levels - 1)  # [B, T]
    in_level = level_of_key[None] == jnp.arange(num_stack_levels)[:, None, None]  # [L, B, T]
    in_level &= key_positions[None, None, :] < num_real[None, :, None]

    def stack_by_levels(x):  # [B, ...] -> [L·B, ...]
        return jnp.broadcast_to(x[None], (num_stack_levels, *x.shape)).reshape(-1, *x.shape[1:])

    level_values = jnp.where(in_level[..., None, None], v[None], 0).reshape(-1, *v.shape[1:])  # [L·B, T, H, V]
    if beta is None:
        _, final = ssd(stack_by_levels(k), stack_by_levels(k), level_values, stack_by_levels(log_a),
                          return_final_state=True, chunk_size=chunk_size)
    else:
        _, final = gated_delta_rule(stack_by_levels(k), stack_by_levels(k), level_values, stack_by_levels(log_a),
                                    stack_by_levels(beta), return_final_state=True, chunk_size=chunk_size)
    final = final.reshape(num_stack_levels, batch, *final.shape[1:])  # [L, B, H, K, V]
    return jnp.moveaxis(final, 0, 2).astype(jnp.float32)


def _recurrent_loglinear(q, k, v, log_a, beta, lam, segment_ids):
    """``impl="recurrent"``: ``_loglinear_step`` applied at every token by a ``lax.scan`` over time.

    Positions restart at every segment start (where the step clears the stack).
    """
    batch, length, heads = v.shape[:3]
    if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    else:
        positions = segment_positions(segment_ids)
    stack = init_level_stack(batch, heads, lam.shape[-1], q.shape[-1], v.shape[-1])
    return _scan_steps(stack, positions, None, q, k, v, log_a, beta, lam)[0]


def _scan_steps(levels, positions, real, q, k, v, log_a, beta, lam):
    """``lax.scan`` of ``_loglinear_step`` over time at ``positions [B, T]``; where ``real [B, T]`` is False
    the stack passes through unchanged. Returns (``[B, T, H, V]``, final levels)."""

    def step(levels, inputs):
        position, real_t, q_t, k_t, v_t, log_a_t, beta_t, lam_t = inputs
        out, updated = _loglinear_step(levels, position, q_t, k_t, v_t, log_a_t, beta_t, lam_t)
        if real_t is not None:
            updated = jnp.where(real_t[:, None, None, None, None], updated, levels)
        return updated, out

    time_major = [None if x is None else jnp.moveaxis(x, 1, 0)
                  for x in (positions, real, q, k, v, log_a, beta, lam)]
    levels, out = lax.scan(step, levels.astype(jnp.float32), tuple(time_major))  # out [T, B, H, V]
    return jnp.moveaxis(out, 0, 1), levels


def _expand_groups(x: jax.Array, num_heads: int, axis: int) -> jax.Array:
    """Repeat head groups so head ``h`` reads group ``h // (H // G)``: ``[..., G, K]`` -> ``[..., H, K]``."""
    return jnp.repeat(x, num_heads // x.shape[axis], axis=axis)


def _loglinear(name, q, k, v, log_a, beta, lam, impl, chunk_size, segment_ids):
    """Validate, trim ``lam`` to ``num_levels(T)`` columns and dispatch on ``impl``."""
    _check_inputs(name, q, k, v, log_a, beta, lam, segment_ids)
    if impl not in LOGLINEAR_IMPLS:
        raise ValueError(f"{name}: impl={impl!r} is not one of {LOGLINEAR_IMPLS}")
    if impl == "pallas":
        return _pallas_loglinear(name, q, k, v, log_a, beta, lam, segment_ids)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"{name}: chunk_size must be a positive power of two, got {chunk_size!r}")

    def xla(xla_impl):
        heads = v.shape[2]
        levels = lam[..., :num_levels(q.shape[1])]
        q_heads, k_heads = _expand_groups(q, heads, axis=2), _expand_groups(k, heads, axis=2)
        if xla_impl == "recurrent":
            out = _recurrent_loglinear(q_heads, k_heads, v, log_a, beta, levels, segment_ids)
        else:
            out = chunked_loglinear(q_heads, k_heads, v, log_a, beta, levels, chunk_size, segment_ids)
        return out.astype(v.dtype)

    if impl == "auto":
        return kernels_unless_unsupported(lambda: _pallas_loglinear(name, q, k, v, log_a, beta, lam, segment_ids),
                                          lambda: xla("chunked"))
    return xla(impl)


def _pallas_loglinear(name, q, k, v, log_a, beta, lam, segment_ids):
    """``impl="pallas"``: ``pallas_kernels.loglinear`` (SSD) or ``pallas_kernels.loglinear_gdn`` (Gated DeltaNet),
    grouped heads passed as they are; packed sequences on the kernels' segment row layout."""
    lam = lam[..., :num_levels(q.shape[1])]
    if beta is not None:
        from pallas_kernels.loglinear_gdn import loglinear_gated_delta_rule_pallas  # XLA impls do not need it

        return loglinear_gated_delta_rule_pallas(q, k, v, log_a, beta, lam, segment_ids=segment_ids).astype(v.dtype)
    from pallas_kernels.loglinear import loglinear_ssd_pallas  # imported here: the XLA impls do not need it

    return loglinear_ssd_pallas(q, k, v, log_a, lam, segment_ids=segment_ids).astype(v.dtype)


def _check_inputs(name, q, k, v, log_a, beta, lam, segment_ids) -> None:
    """Clear errors for shapes outside the ops contract (module docstring)."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"{name}: q and k must both be [B, T, G, K], got q {q.shape} and k {k.shape}")
    batch, length, groups, _ = q.shape
    if v.ndim != 4 or v.shape[:2] != (batch, length) or v.shape[2] % groups:
        raise ValueError(f"{name}: v must be [B={batch}, T={length}, H, V] with H a multiple of G={groups}, "
                         f"got {v.shape}")
    heads = v.shape[2]
    if log_a.shape != (batch, length, heads):
        raise ValueError(f"{name}: log_a must be [B, T, H] = {(batch, length, heads)}, got {log_a.shape}")
    if beta is not None and beta.shape != (batch, length, heads):
        raise ValueError(f"{name}: beta must be [B, T, H] = {(batch, length, heads)}, got {beta.shape}")
    needed = num_levels(length)
    if lam.ndim != 4 or lam.shape[:3] != (batch, length, heads) or lam.shape[3] < needed:
        raise ValueError(f"{name}: lam must be [B, T, H, L] = [{batch}, {length}, {heads}, L] with "
                         f"L >= num_levels(T={length}) = {needed}, got {lam.shape}")
    if segment_ids is not None and segment_ids.shape != (batch, length):
        raise ValueError(f"{name}: segment_ids must be [B, T] = {(batch, length)}, got {segment_ids.shape}")
