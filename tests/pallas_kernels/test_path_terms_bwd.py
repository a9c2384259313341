"""PaTH per-block terms' backward kernel (interpret mode on CPU) against ``jax.vjp`` of the XLA block terms
``jaxlm.ops.path_blockwise.blockwise_terms`` evaluated in float64."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64, vjp

from jaxlm.ops.path_blockwise import BlockwiseTerms, blockwise_terms
from pallas_kernels.path.kernel_terms_bwd import path_terms_backward
from pallas_kernels.path.layout import head_major, head_major_tokens, xla_block_terms


def random_inputs(seed, batch, length, heads, groups, dim):
    """q ``[B, T, H, D]``, k and unit w ``[B, T, G, D]``, β ``[B, T, G]`` in (0, 2): every fifth token 1.999,
    every seventh (from the second) exactly 0."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, dim))
    k = rng.normal(size=(batch, length, groups, dim))
    w = rng.normal(size=(batch, length, groups, dim))
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    beta = rng.uniform(0.05, 2.0, size=(batch, length, groups))
    beta[:, ::5] = 1.999
    beta[:, 1::7] = 0.0
    return q, k, w, beta


def random_cotangents(seed, batch, padded_length, heads, groups, dim, block):
    """Kernel-layout cotangents: ``dQ̄ [B, H, T', D]``, ``dS [B, H, N·C, C]``, ``dK̄ [B, G, T', D]``,
    ``dP [B, G, N·D, D]``."""
    rng = np.random.default_rng(seed)
    num_blocks = padded_length // block
    return (rng.normal(size=(batch, heads, padded_length, dim)), rng.normal(size=(batch, heads, padded_length, block)),
            rng.normal(size=(batch, groups, padded_length, dim)), rng.normal(size=(batch, groups, num_blocks * dim, dim)))


def zero_padding_rows(cotangents, length, block):
    """The cotangents with every padded token's rows (and its columns of ``dS``) set to 0."""
    d_queries, d_intra, d_keys, d_products = (np.array(x) for x in cotangents)
    d_queries[:, :, length:] = 0.0
    d_keys[:, :, length:] = 0.0
    d_intra[:, :, length:] = 0.0
    last_block_start = (d_intra.shape[2] // block - 1) * block
    d_intra[:, :, last_block_start:, length - last_block_start:] = 0.0
    return d_queries, d_intra, d_keys, d_products


def float64_pullback(q, k, w, beta, cotangents, block):
    """``(dq [B, H, T, D], dk, dw [B, G, T, D], dβ [B, G, T])`` from ``jax.vjp`` of ``blockwise_terms`` in float64,
    with the kernel-layout cotangents moved into ``BlockwiseTerms``' layout (values and gates: 0)."""
    batch, length, heads, dim = q.shape
    groups = k.shape[2]
    heads_per_group = heads // groups
    d_queries, d_intra, d_keys, d_products = cotangents
    num_blocks = d_products.shape[2] // dim
    with enable_x64():
        inputs = [jnp.asarray(x, jnp.float64) for x in (q, k, k, w, beta)]
        terms, pullback = vjp(lambda *x: blockwise_terms(*x, None, block), *inputs)
        d_terms = BlockwiseTerms(
            queries_at_start=d_queries.reshape(batch, groups, heads_per_group, num_blocks, block, dim)
            .transpose(0, 3, 4, 1, 2, 5),
            intra_logits=d_intra.reshape(batch, groups, heads_per_group, num_blocks, block, block)
            .transpose(0, 3, 1, 2, 4, 5),
            keys_at_end=d_keys.reshape(batch, groups, num_blocks, block, dim).transpose(0, 2, 3, 1, 4),
            values=np.zeros(terms.values.shape),
            products=d_products.reshape(batch, groups, num_blocks, dim, dim).transpose(0, 2, 1, 3, 4),
            cumulative_gate=np.zeros(terms.cumulative_gate.shape))
        dq, dk, _, dw, dbeta = pullback(jax_tree_float64(d_terms))
        return (np.asarray(dq).transpose(0, 2, 1, 3), np.asarray(dk).transpose(0, 2, 1, 3),
                np.asarray(dw).transpose(0, 2, 1, 3), np.asarray(dbeta).transpose(0, 2, 1))


def jax_tree_float64(terms: BlockwiseTerms) -> BlockwiseTerms:
    return BlockwiseTerms(*(jnp.asarray(x, jnp.float64) for x in terms))


def kernel_pullback(q, k, w, beta, cotangents, block, dtype=jnp.float32):
    """The kernel's ``(dq, dk, dw, dβ)`` on head-major, zero-padded (β = 0) inputs, q, k, w in ``dtype``."""
    q, k, w = (jnp.asarray(x, dtype) for x in (q, k, w))
    beta = jnp.asarray(beta, jnp.float32)
    transform = xla_block_terms(k, w, beta, block, jnp.float32)[0]  # [B, G, N·C, C]
    operands = [head_major(x, block) for x in (q, k, w)] + [head_major_tokens(beta, block), transform]
    results = path_terms_backward(*operands, *(jnp.asarray(x, jnp.float32) for x in cotangents), block=block)
    return tuple(np.asarray(x, np.float64) for x in results)


def assert_close(actual, expected, length, tolerance):
    """Each output's real tokens within ``tolerance`` of the oracle, relative to the oracle's largest entry."""
    for name, got, want in zip(("dq", "dk", "dw", "dbeta"), actual, expected):
        got = got[:, :, :length]
        error = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("batch, length, heads, groups, block, dim",
                         [(2, 40, 4, 2, 16, 32), (1, 50, 2, 1, 32, 16)])
def test_matches_float64_pullback_of_block_terms(batch, length, heads, groups, block, dim):
    q, k, w, beta = random_inputs(length, batch, length, heads, groups, dim)
    padded_length = -(-length // block) * block
    cotangents = zero_padding_rows(random_cotangents(dim, batch, padded_length, heads, groups, dim, block),
                                   length, block)
    expected = float64_pullback(q, k, w, beta, cotangents, block)
    assert_close(kernel_pullback(q, k, w, beta, cotangents, block), expected, length, 1e-4)


def test_padded_tokens_cotangents_do_not_leak():
    batch, length, heads, groups, block, dim = 1, 21, 2, 1, 16, 16
    q, k, w, beta = random_inputs(5, batch, length, heads, groups, dim)
    cotangents = random_cotangents(6, batch, 32, heads, groups, dim, block)
    expected = float64_pullback(q, k, w, beta, zero_padding_rows(cotangents, length, block), block)
    actual = kernel_pullback(q, k, w, beta, cotangents, block)
    assert np.max(np.abs(cotangents[0][:, :, length:])) > 1.0  # the padding's cotangents are not 0
    assert_close(actual, expected, length, 1e-4)


def test_bf16_inputs_within_bf16_tolerance():
    batch, length, heads, groups, block, dim = 1, 32, 2, 1, 16, 32
    q, k, w, beta = random_inputs(9, batch, length, heads, groups, dim)
    q, k, w = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in (q, k, w))
    cotangents = random_cotangents(10, batch, length, heads, groups, dim, block)
    expected = float64_pullback(q, k, w, beta, cotangents, block)
    assert_close(kernel_pullback(q, k, w, beta, cotangents, block, jnp.bfloat16), expected, length, 1e-2)


def test_rejects_partial_blocks_and_mismatched_shapes():
    q = jnp.zeros((1, 2, 48, 16))
    kv = jnp.zeros((1, 1, 48, 16))
    operands = [q, kv, kv, jnp.zeros((1, 1, 48)), jnp.zeros((1, 1, 48, 16)), q, jnp.zeros((1, 2, 48, 16)), kv,
                jnp.zeros((1, 1, 48, 16))]
    with pytest.raises(ValueError, match="whole blocks"):
        path_terms_backward(*operands, block=32)
    operands[7] = jnp.zeros((1, 2, 48, 16))
    with pytest.raises(ValueError, match="d_keys"):
        path_terms_backward(*operands, block=16)
