"""PaTH preprocessing kernel (interpret mode on CPU) against the XLA block terms of
``jaxlm.ops.path_blockwise`` evaluated in float64: UT transform, keys carried to the block end, block products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from jaxlm.ops.path_blockwise import block_products, intra_block_terms, keys_to_block_end, to_blocks, ut_transform
from pallas_kernels.path.api import path_attention_pallas
from pallas_kernels.path.kernel_prep import path_preprocess, path_query_terms
from pallas_kernels.path.layout import head_major, padded_time_major


def random_block_inputs(seed, batch, length, groups, dim):
    """k, unit w ``[B, T, G, D]``, β ``[B, T, G]`` in (0, 2) with every fourth token near 2."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(batch, length, groups, dim))
    w = rng.normal(size=(batch, length, groups, dim))
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    beta = rng.uniform(0.05, 2.0, size=(batch, length, groups))
    beta[:, ::4] = 1.999
    return k, w, beta


def float64_terms(k, w, beta, block):
    """(𝒯, K̄, P) in the kernel's layout, from the XLA block terms in float64."""
    with enable_x64():
        kb, wb = (to_blocks(jnp.asarray(x, jnp.float64), block) for x in (k, w))  # [B, N, C, G, D]
        transform = ut_transform(wb, to_blocks(jnp.asarray(beta, jnp.float64), block))  # [B, N, G, C, C]
        carried = keys_to_block_end(kb, wb, transform)  # [B, N, C, G, D]
        products = block_products(wb, transform)  # [B, N, G, D, D]
        batch, num_blocks, _, groups, dim = kb.shape
        return (np.asarray(jnp.moveaxis(transform, 2, 1).reshape(batch, groups, num_blocks * block, block)),
                np.asarray(jnp.moveaxis(carried, 3, 1).reshape(batch, groups, num_blocks * block, dim)),
                np.asarray(jnp.moveaxis(products, 2, 1).reshape(batch, groups, num_blocks * dim, dim)))


@pytest.mark.parametrize("batch, length, groups, block, sub_block", [(2, 40, 2, 32, 16), (1, 50, 1, 64, 16)])
def test_preprocess_matches_float64_block_terms(batch, length, groups, block, sub_block):
    k, w, beta = random_block_inputs(length, batch, length, groups, 16)
    expected = float64_terms(k, w, beta, block)
    actual = path_preprocess(padded_time_major(jnp.asarray(k, jnp.float32), block), padded_time_major(jnp.asarray(w, jnp.float32), block),
                             padded_time_major(jnp.asarray(beta, jnp.float32), block), block=block, sub_block=sub_block)
    for name, got, want in zip(("transform", "carried keys", "products"), actual, expected):
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-5 * scale, rtol=0, err_msg=name)


def test_preprocess_bf16_inputs_within_bf16_tolerance():
    k, w, beta = random_block_inputs(7, 1, 32, 1, 32)
    expected = float64_terms(np.asarray(jnp.asarray(k, jnp.bfloat16), np.float64),
                             np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64), beta, 32)
    actual = path_preprocess(jnp.asarray(k, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(beta, jnp.float32),
                             block=32)
    assert actual[1].dtype == jnp.bfloat16 and actual[0].dtype == actual[2].dtype == jnp.float32
    for got, want in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-2 * np.max(np.abs(want)), rtol=0)


def test_preprocess_rejects_partial_blocks_and_bad_sub_blocks():
    x = jnp.zeros((1, 48, 1, 16))
    with pytest.raises(ValueError, match="whole blocks"):
        path_preprocess(x, x, jnp.zeros((1, 48, 1)), block=32)
    with pytest.raises(ValueError, match="sub_block"):
        path_preprocess(x, x, jnp.zeros((1, 48, 1)), block=48, sub_block=12)


def test_attention_with_kernel_preprocessing_equals_xla_preprocessing():
    k, w, beta = random_block_inputs(3, 1, 40, 1, 16)
    rng = np.random.default_rng(4)
    q, v = (jnp.asarray(rng.normal(size=(1, 40, 2, 16)), jnp.float32) for _ in range(2))
    k, w, v1 = jnp.asarray(k, jnp.float32), jnp.asarray(w, jnp.float32), v[:, :, :1]
    with jax.default_matmul_precision("highest"):  # XLA:GPU would otherwise use TF32 for the XLA terms
        outputs = [path_attention_pallas(q, k, v1, w, jnp.asarray(beta, jnp.float32), block_size=16, preprocess=where)
                   for where in ("xla", "kernel")]
    np.testing.assert_allclose(np.asarray(outputs[1]), np.asarray(outputs[0]), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="preprocess"):
        path_attention_pallas(q, k, v1, w, jnp.asarray(beta, jnp.float32), preprocess="cuda")


def test_query_terms_match_float64_intra_block_terms():
    """Q̄ and S per query head (two heads per KV head, T not a multiple of the block) against the XLA block
    terms in float64."""
    batch, length, groups, heads_per_group, dim, block = 2, 40, 2, 2, 16, 16
    k, w, beta = random_block_inputs(11, batch, length, groups, dim)
    q = np.random.default_rng(12).normal(size=(batch, length, groups * heads_per_group, dim))
    transform64, _, _ = float64_terms(k, w, beta, block)  # [B, G, N·C, C]
    with enable_x64():
        qb = to_blocks(jnp.asarray(q.reshape(batch, length, groups, heads_per_group, dim)), block)
        kb, wb = (to_blocks(jnp.asarray(x), block) for x in (k, w))
        transform = jnp.asarray(transform64).reshape(batch, groups, -1, block, block).transpose(0, 2, 1, 3, 4)
        intra, queries = intra_block_terms(qb, kb, wb, transform)  # [B, N, G, R, C, C], [B, N, C, G, R, D]
        num_blocks = qb.shape[1]
        want_intra = np.asarray(intra.transpose(0, 2, 3, 1, 4, 5).reshape(batch, -1, num_blocks * block, block))
        want_queries = np.asarray(queries.transpose(0, 3, 4, 1, 2, 5).reshape(batch, -1, num_blocks * block, dim))
    got_queries, got_intra = path_query_terms(*(head_major(jnp.asarray(x, jnp.float32), block) for x in (q, k, w)),
                                              jnp.asarray(transform64, jnp.float32), block=block)
    for name, got, want in (("queries", got_queries, want_queries), ("intra", got_intra, want_intra)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-5 * np.max(np.abs(want)), rtol=0,
                                   err_msg=name)
