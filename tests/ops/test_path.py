"""PaTH attention: naive and blockwise forms against a float64 numpy oracle built from explicit Householder
matrix products, against each other (forward and gradients), decode steps, prefill keys and segments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from jaxlm.ops.attention import attention
from jaxlm.ops.path import path_attention, path_decode_step, path_prefill_keys

B, T, H, G, D = 2, 37, 4, 2, 6
BLOCK = 16


def random_inputs(seed=0, length=T, beta_range=(0.05, 1.999), dtype=np.float64):
    """q, k, v, w (unit rows), beta in ``beta_range`` (near 2 by default at the top), log_f in (log 0.5, 0)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, length, H, D))
    k = rng.normal(size=(B, length, G, D))
    v = rng.normal(size=(B, length, G, D))
    w = rng.normal(size=(B, length, G, D))
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    beta = rng.uniform(*beta_range, size=(B, length, G))
    beta[:, ::3] = rng.uniform(1.95, 1.999, size=beta[:, ::3].shape)  # many Householders close to reflections
    log_f = np.log(rng.uniform(0.5, 1.0, size=(B, length, H)))
    return tuple(x.astype(dtype) for x in (q, k, v, w, beta, log_f))


def householder(w_t, beta_t):
    return np.eye(len(w_t)) - beta_t * np.outer(w_t, w_t)


def explicit_products(w, beta):
    """``M[b, g, i, j] = H_i H_{i−1} … H_{j+1}`` (identity for j = i) as explicit D×D matrix products."""
    length = w.shape[1]
    products = np.zeros((B, G, length, length, D, D))
    for b in range(B):
        for g in range(G):
            for i in range(length):
                product = np.eye(D)
                for j in range(i, -1, -1):
                    products[b, g, i, j] = product
                    product = product @ householder(w[b, j, g], beta[b, j, g])
    return products


def numpy_path_attention_of(inputs, with_gate=True):
    """``o_i = Σ_{j≤i} softmax_j(D^{-1/2} q_iᵀ (H_i … H_{j+1}) k_j + G_i − G_j) v_j`` in float64,
    one (i, j) at a time."""
    q, k, v, w, beta, log_f = inputs
    length = q.shape[1]
    products = explicit_products(w, beta)
    gate = np.cumsum(log_f, axis=1) if with_gate else np.zeros_like(log_f)
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for i in range(length):
                logits = np.array([q[b, i, h] @ products[b, g, i, j] @ k[b, j, g] * D ** -0.5
                                   + gate[b, i, h] - gate[b, j, h] for j in range(i + 1)])
                weights = np.exp(logits - logits.max())
                out[b, i, h] = (weights / weights.sum()) @ v[b, : i + 1, g]
    return out


def numpy_path_attention(seed, with_gate=True):
    return numpy_path_attention_of(random_inputs(seed), with_gate)


def run(inputs, with_gate, **kwargs):
    """Jitted ``path_attention`` on numpy/jax inputs ``(q, k, v, w, beta, log_f)``; no gate unless ``with_gate``."""
    q, k, v, w, beta, log_f = inputs
    arrays = (q, k, v, w, beta) + ((log_f,) if with_gate else ())
    return jax.jit(functools.partial(path_attention, **kwargs))(*(jnp.asarray(x) for x in arrays))


GATES = pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "no_gate"])
ARGUMENT_NAMES = ("q", "k", "v", "w", "beta", "log_f")


@functools.lru_cache(maxsize=None)
def float64_outputs_and_gradients(with_gate):
    """{impl: (output, gradients of sum(output · cotangent) wrt every input)} in float64, one compilation."""
    cotangent = np.random.default_rng(5).normal(size=(B, T, H, D))
    count = 6 if with_gate else 5

    def loss(impl, *args):
        gate = args[5] if with_gate else None
        out = path_attention(*args[:5], gate, impl=impl, block_size=BLOCK)
        return jnp.sum(out * cotangent), out

    def both(*args):
        return {impl: jax.grad(functools.partial(loss, impl), tuple(range(count)), has_aux=True)(*args)[::-1]
                for impl in ("naive", "blockwise")}

    with enable_x64(True):
        inputs = tuple(jnp.asarray(x) for x in random_inputs(0))[:count]
        results = jax.jit(both)(*inputs)
        return jax.tree.map(np.asarray, results)


@GATES
def test_naive_and_blockwise_match_numpy_oracle(with_gate):
    expected = numpy_path_attention(0, with_gate=with_gate)
    results = float64_outputs_and_gradients(with_gate)
    for impl in ("naive", "blockwise"):
        assert results[impl][0].dtype == np.float64
        np.testing.assert_allclose(results[impl][0], expected, rtol=1e-10, atol=1e-10, err_msg=impl)
    # The Householders matter: without them (plain softmax) the result is far from the oracle.
    q, k, v, _, _, log_f = random_inputs(0)
    gate = np.cumsum(log_f, 1) if with_gate else np.zeros_like(log_f)
    logits = np.einsum("bihd,bjhd->bhij", q, k.repeat(H // G, 2)) * D ** -0.5 + (
        gate.transpose(0, 2, 1)[..., :, None] - gate.transpose(0, 2, 1)[..., None, :])
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    plain = np.einsum("bhij,bjhd->bihd", weights / weights.sum(-1, keepdims=True), v.repeat(H // G, 2))
    assert np.abs(expected - plain).max() > 1e-2


@GATES
def test_blockwise_gradients_match_naive(with_gate):
    results = float64_outputs_and_gradients(with_gate)
    expected, found = results["naive"][1], results["blockwise"][1]
    for name, grad_naive, grad_blockwise in zip(ARGUMENT_NAMES, expected, found):
        assert np.abs(grad_naive).max() > 1e-3, name
        np.testing.assert_allclose(grad_blockwise, grad_naive, rtol=1e-9, atol=1e-9, err_msg=name)


def test_beta_zero_is_causal_softmax_attention_without_positions():
    q, k, v, w, beta, _ = random_inputs(2, dtype=np.float32)
    expected = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="reference")
    def both(*args):
        return [path_attention(*args, impl=impl, block_size=BLOCK) for impl in ("naive", "blockwise")]

    for impl, found in zip(("naive", "blockwise"), jax.jit(both)(*(jnp.asarray(x) for x in (q, k, v, w, 0 * beta)))):
        np.testing.assert_allclose(np.asarray(found), np.asarray(expected), rtol=1e-5, atol=1e-5, err_msg=impl)


def test_prefill_keys_match_explicit_products():
    _, k, _, w, beta, _ = random_inputs(0)
    products = explicit_products(w, beta)  # products[:, :, T-1, j] = H_{T−1} … H_{j+1}
    expected = np.einsum("bgjde,bjge->bjgd", products[:, :, T - 1], k)
    with enable_x64(True):
        found = path_prefill_keys(jnp.asarray(k), jnp.asarray(w), jnp.asarray(beta), block_size=BLOCK)
        np.testing.assert_allclose(np.asarray(found), expected, rtol=1e-10, atol=1e-10)
    assert np.abs(expected - k).max() > 1e-1


def test_decode_steps_match_parallel_and_prefill_keys():
    """Decode token by token from an empty cache (with the forget gate): outputs == the blockwise form,
    and the cached keys end up equal to ``path_prefill_keys``."""
    q, k, v, w, beta, log_f = (jnp.asarray(x) for x in random_inputs(3, dtype=np.float32))
    slots = T + 3

    def decode_all(q, k, v, w, beta, log_f):
        def step(cache, token):
            cache_k, cache_v, length, cum_log_f = cache
            out, cache = path_decode_step(cache_k, cache_v, length, *token, cum_log_f)
            return cache, out

        cache = (jnp.zeros((B, slots, G, D)), jnp.zeros((B, slots, G, D)), jnp.zeros((B,), jnp.int32),
                 jnp.zeros((B, slots, H)))
        tokens = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, w, beta, log_f))  # [T, B, ...]
        (cache_k, _, length, _), outputs = jax.lax.scan(step, cache, tokens)
        return (jnp.moveaxis(outputs, 0, 1), cache_k[:, :T], length,
                path_attention(q, k, v, w, beta, log_f, block_size=BLOCK),
                path_prefill_keys(k, w, beta, block_size=BLOCK))

    decoded, cached_keys, length, expected, prefill_keys = jax.jit(decode_all)(q, k, v, w, beta, log_f)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(expected), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(length), [T, T])
    np.testing.assert_allclose(np.asarray(cached_keys), np.asarray(prefill_keys), rtol=2e-5, atol=2e-5)


def test_segment_ids_equal_separate_segments():
    """Packed segments of 10, 17 and 10 tokens (boundaries inside blocks) == each segment run alone."""
    lengths = (10, 17, 10)
    segment_ids = np.repeat(np.repeat(np.arange(1, 4), lengths)[None], B, 0)
    inputs = random_inputs(0)
    starts = np.cumsum((0,) + lengths)
    expected = np.concatenate([numpy_path_attention_of(tuple(x[:, a:b] for x in inputs))
                               for a, b in zip(starts[:-1], starts[1:])], axis=1)

    def both(*args):
        return [path_attention(*args, impl=impl, block_size=BLOCK, segment_ids=jnp.asarray(segment_ids))
                for impl in ("naive", "blockwise")]

    with enable_x64(True):
        for impl, found in zip(("naive", "blockwise"), jax.jit(both)(*(jnp.asarray(x) for x in inputs))):
            np.testing.assert_allclose(np.asarray(found), expected, rtol=1e-10, atol=1e-10, err_msg=impl)
    assert np.abs(numpy_path_attention(0)[:, 10:] - expected[:, 10:]).max() > 1e-2


def test_bfloat16_inputs_are_close_to_float32():
    inputs = random_inputs(6, dtype=np.float32)
    as_bf16 = tuple(jnp.asarray(x, jnp.bfloat16) for x in inputs[:3]) + tuple(jnp.asarray(x) for x in inputs[3:])
    rounded = tuple(x.astype(jnp.float32) for x in as_bf16)
    found, expected = jax.jit(lambda low, high: (path_attention(*low, block_size=BLOCK),
                                                 path_attention(*high, impl="naive")))(as_bf16, rounded)
    assert found.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(found, np.float32), np.asarray(expected), rtol=1e-2, atol=1e-2)


def test_bad_arguments_name_what_is_wrong():
    q, k, v, w, beta, log_f = (jnp.asarray(x) for x in random_inputs(0, length=5, dtype=np.float32))
    with pytest.raises(ValueError, match="head_dim=6 must be a power of two"):
        path_attention(q, k, v, w, beta, impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        path_attention(q, k, v, w, beta, impl="flash")
    with pytest.raises(ValueError, match="beta must be"):
        path_attention(q, k, v, w, beta[..., :1])
    with pytest.raises(ValueError, match="log_f must be"):
        path_attention(q, k, v, w, beta, log_f[..., :2])
    with pytest.raises(ValueError, match="multiple of num KV heads"):
        path_attention(q[:, :, :3], k, v, w, beta)
    with pytest.raises(ValueError, match="block_size"):
        path_attention(q, k, v, w, beta, block_size=0)


@pytest.mark.slow
def test_long_sequence_has_no_nans():
    """65536 bf16 tokens through the blockwise forward (one head, D = 16, blocks of 2048) stay finite."""
    length = 65536
    rng = np.random.default_rng(7)
    shape = (1, length, 1, 16)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for _ in range(4))
    w = w / jnp.linalg.norm(w.astype(jnp.float32), axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.0, 2.0, size=shape[:3]), jnp.float32)
    log_f = jnp.asarray(np.log(rng.uniform(0.9, 1.0, size=shape[:3])), jnp.float32)
    out = jax.jit(functools.partial(path_attention, block_size=2048))(q, k, v, w, beta, log_f)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert float(jnp.abs(out.astype(jnp.float32)).max()) > 0.1


@pytest.mark.slow
def test_prefill_keys_of_64k_tokens_have_no_nans():
    """Carrying keys through 65536 Householders (β up to 2) stays finite; each H has norm ≤ 1, so no key grows."""
    length = 65536
    rng = np.random.default_rng(8)
    shape = (1, length, 1, 8)
    k = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.0, 2.0, size=shape[:3]), jnp.float32)
    keys = jax.jit(functools.partial(path_prefill_keys, block_size=256))(k, w, beta)
    assert bool(jnp.all(jnp.isfinite(keys)))
    key_norms = jnp.linalg.norm(keys, axis=-1)
    assert float(jnp.max(key_norms - jnp.linalg.norm(k.astype(jnp.float32), axis=-1))) < 1e-3
    assert float(key_norms[:, : length // 2].max()) < 1.0  # early keys have been contracted by many H
