"""Attention (xla and reference impls) against a float64 numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops

attention = jax.jit(ops.attention, static_argnames=("scale", "impl"))


def numpy_attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, kv_valid=None):
    """float64 loop-free oracle: softmax over visible keys, head h uses kv head h // (H // G)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # [B, S, H, D]
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    visible = kv_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if q_seg is not None:
        visible &= q_seg[:, :, None] == kv_seg[:, None, :]
    if kv_valid is not None:
        visible &= kv_valid[:, None, :]
    logits = np.where(visible[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def random_qkv(rng, batch, q_len, kv_len, heads, kv_heads, dim):
    q = rng.normal(size=(batch, q_len, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_len, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(batch, kv_len, kv_heads, dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_plain_causal_matches_oracle(impl):
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(rng, 2, 37, 37, 4, 2, 16)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl)
    arange = np.broadcast_to(np.arange(37), (2, 37))
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, arange, arange), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_queries_at_offsets_attend_to_longer_keys(impl):
    """T != S, per-row query positions (decode-like), GQA with 3 query heads per kv head."""
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, 2, 5, 23, 6, 2, 8)
    q_pos = np.stack([np.arange(5) + 10, np.arange(5) + 17]).astype(np.int32)
    kv_pos = np.broadcast_to(np.arange(23, dtype=np.int32), (2, 23))
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_positions=jnp.asarray(q_pos),
                    kv_positions=jnp.asarray(kv_pos), impl=impl)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, q_pos, kv_pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_segments_and_kv_valid_mask_keys(impl):
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 2, 19, 19, 4, 1, 8)
    segments = np.array([[1] * 7 + [2] * 9 + [0] * 3, [1] * 4 + [2] * 4 + [3] * 11], np.int32)
    positions = np.stack([np.concatenate([np.arange(7), np.arange(9), np.arange(3)]),
                          np.concatenate([np.arange(4), np.arange(4), np.arange(11)])]).astype(np.int32)
    kv_valid = np.ones((2, 19), bool)
    kv_valid[1, 9] = False  # hide the second key of segment 3 in row 1 (its first key stays visible)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_positions=jnp.asarray(positions),
                    kv_positions=jnp.asarray(positions), q_segment_ids=jnp.asarray(segments),
                    kv_segment_ids=jnp.asarray(segments), kv_valid=jnp.asarray(kv_valid), impl=impl)
    expected = numpy_attention(q, k, v, positions, positions, segments, segments, kv_valid)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_xla_close_to_reference_and_oracle():
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 2, 37, 37, 4, 2, 16)
    q16, k16, v16 = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    positions = jnp.asarray(np.broadcast_to(np.arange(37, dtype=np.int32) + 2, (2, 37)))
    fast = attention(q16, k16, v16, q_positions=positions, kv_positions=positions, impl="xla")
    reference = attention(q16, k16, v16, impl="reference")
    assert fast.dtype == jnp.bfloat16 and reference.dtype == jnp.bfloat16
    arange = np.broadcast_to(np.arange(37), (2, 37))
    exact = numpy_attention(*(np.asarray(a.astype(jnp.float32)) for a in (q16, k16, v16)), arange, arange)
    np.testing.assert_allclose(np.asarray(fast.astype(jnp.float32)), exact, atol=2e-2)
    np.testing.assert_allclose(np.asarray(reference.astype(jnp.float32)), exact, atol=1e-2)


def test_bad_inputs_raise_clear_errors():
    q, k = jnp.ones((1, 4, 3, 8)), jnp.ones((1, 4, 2, 8))
    attention = ops.attention
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="impl='flash' is not supported"):
        attention(q, q, q, impl="flash")
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        attention(q, q, q, impl="cudnn")
    with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
        attention(q, q, q, q_segment_ids=jnp.ones((1, 4), jnp.int32))
