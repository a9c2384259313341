"""PaTH Pallas backward kernels (interpret mode on CPU): every gradient (q, k, v, w, β, forget gate) against
the float64 naive product form and against the XLA linear-memory backward, with GQA, T not a multiple of the
block, segment boundaries inside blocks, β near 2 and exactly 1, several super-blocks; bf16 inputs without
gate or segments; the block terms rebuilt and pulled back by kernels (the default) and by XLA; the super-block
choice and the backward switches' errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from jaxlm.ops.path import naive_path_attention
from pallas_kernels.path import path_attention_pallas
from pallas_kernels.path import blocks as path_block_sizes
from pallas_kernels.path.blocks import default_superblock

D = 16
NAMES = ("q", "k", "v", "w", "beta", "log_f")


def random_inputs(seed, batch, length, heads, groups):
    """float64 q, k, v, unit w, β in (0.05, 2) with every third near 2 and some exactly 1, log_f in (log ½, 0)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, D))
    k, v, w = (rng.normal(size=(batch, length, groups, D)) for _ in range(3))
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    beta = rng.uniform(0.05, 1.999, size=(batch, length, groups))
    beta[:, ::3] = rng.uniform(1.97, 1.999, size=beta[:, ::3].shape)  # close to reflections
    beta[:, 2::7] = 1.0  # singular products
    log_f = np.log(rng.uniform(0.5, 1.0, size=(batch, length, heads)))
    return [q, k, v, w, beta, log_f], rng.normal(size=q.shape)


def pallas_gradients(inputs, cotangent, segment_ids, with_gate, **options):
    """Gradients of ``Σ out · cotangent`` wrt the inputs (log_f only ``with_gate``), jitted."""
    count = 6 if with_gate else 5

    def loss(*args):
        gate = args[5] if with_gate else None
        out = path_attention_pallas(*args[:5], gate, segment_ids, block_size=16, **options)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.jit(jax.grad(loss, tuple(range(count))))(*inputs[:count])


def naive_gradients(inputs, cotangent, segment_ids, with_gate):
    """The same gradients of the float64 naive product form."""
    count = 6 if with_gate else 5
    with enable_x64():
        def loss(*args):
            gate = args[5] if with_gate else None
            out = naive_path_attention(*args[:5], gate, scale=D ** -0.5, segment_ids=segment_ids)
            return jnp.sum(out * jnp.asarray(cotangent))

        grads = jax.grad(loss, tuple(range(count)))(*(jnp.asarray(x, jnp.float64) for x in inputs[:count]))
        return [np.asarray(x) for x in grads]


def assert_close(actual, expected, tol, name):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, name
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=name)


def test_gradients_match_float64_naive_and_xla_backward():
    """GQA (4 query heads on 2 KV heads), forget gate, T = 70 (5 blocks of 16, the last partial), segment
    boundaries inside blocks, super-blocks of 2 key blocks (the moved queries are rebuilt through super-block
    products and per-block suffixes)."""
    inputs, cotangent = random_inputs(11, batch=1, length=70, heads=4, groups=2)
    segment_ids = jnp.asarray(np.repeat([0, 1, 2], [13, 40, 17])[None], jnp.int32)
    as_float32 = [jnp.asarray(x, jnp.float32) for x in inputs]
    cotangent32 = jnp.asarray(cotangent, jnp.float32)
    with jax.default_matmul_precision("float32"):  # the XLA precomputation: no TF32 on GPU
        kernels = pallas_gradients(as_float32, cotangent32, segment_ids, True, superblock=2)
        reference = pallas_gradients(as_float32, cotangent32, segment_ids, True, backward="xla",
                                     backward_group_size=2)
        xla_terms = pallas_gradients(as_float32, cotangent32, segment_ids, True, superblock=2,
                                     terms_backward="xla")
        rebuilt_terms = pallas_gradients(as_float32, cotangent32, segment_ids, True, superblock=2,
                                         save_block_terms=False)
    expected = naive_gradients(inputs, cotangent, segment_ids, True)
    for name, found, from_xla, from_xla_terms, rebuilt, wanted in zip(NAMES, kernels, reference, xla_terms,
                                                                      rebuilt_terms, expected):
        assert np.abs(wanted).max() > 1e-3, name  # every gradient is exercised
        assert_close(found, wanted, 1e-4, name)
        assert_close(found, from_xla, 2e-5, name)
        assert_close(from_xla_terms, from_xla, 2e-5, name)
        assert_close(rebuilt, found, 2e-5, name)


def test_bfloat16_gradients_without_gate_or_segments():
    """bf16 q, k, v, w (β float32), no gate, no segments, T = 40, default super-blocks: within 2e-2 of the
    float64 naive gradients on the bf16-rounded inputs."""
    inputs, cotangent = random_inputs(5, batch=1, length=40, heads=2, groups=1)
    as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in inputs[:4]] + [jnp.asarray(inputs[4], jnp.float32)]
    found = pallas_gradients(as_bf16, jnp.asarray(cotangent, jnp.float32), None, False)
    expected = naive_gradients([np.asarray(x, np.float64) for x in as_bf16], cotangent, None, False)
    for name, actual, wanted in zip(NAMES, found, expected):
        assert actual.dtype == as_bf16[NAMES.index(name)].dtype, name
        assert_close(actual, wanted, 2e-2, name)


@pytest.mark.parametrize("num_blocks, superblock", [(1, 1), (2, 2), (3, 2), (4, 2), (5, 3), (64, 8), (65, 9)])
def test_default_superblock_is_ceil_sqrt(num_blocks, superblock):
    assert default_superblock(num_blocks) == superblock


@pytest.mark.parametrize("backward, terms_backward, asked, saved", [
    ("kernels", "kernel", True, True), ("kernels", "kernel", False, False), ("kernels", "xla", True, False),
    ("xla", "kernel", True, False)])
def test_block_terms_are_saved_only_for_the_kernels_backward(backward, terms_backward, asked, saved):
    blocks = path_block_sizes.path_blocks(D, jnp.float32, backward=backward, terms_backward=terms_backward,
                                          save_block_terms=asked)
    assert blocks.saves_block_terms is saved
    args = [jnp.ones((1, 40, 2, D))] * 4 + [jnp.full((1, 40, 2), 0.5)]
    _, vjp = jax.vjp(lambda *x: path_attention_pallas(*x, block_size=16, backward=backward,
                                                      terms_backward=terms_backward, save_block_terms=asked), *args)
    head_major_rows = [x for x in jax.tree.leaves(vjp) if x.shape == (1, 2, 48, D)]  # T' = 48, C = D = 16
    assert len(head_major_rows) == (4 if saved else 1)  # the output, then 𝒯, k̄ and P when saved


def test_backward_switch_rejects_bad_values():
    args = [jnp.ones((1, 16, 1, D))] * 4 + [jnp.ones((1, 16, 1))]
    with pytest.raises(ValueError, match="backward='autodiff' must be one of"):
        path_attention_pallas(*args, block_size=16, backward="autodiff")
    with pytest.raises(ValueError, match="superblock=0 must be a positive integer"):
        path_attention_pallas(*args, block_size=16, superblock=0)
    with pytest.raises(ValueError, match="terms_backward='autodiff' must be one of"):
        path_attention_pallas(*args, block_size=16, terms_backward="autodiff")


@pytest.mark.parametrize("platform, dtype, expected", [("gpu", jnp.float32, "xla"), ("gpu", jnp.bfloat16, "kernel"),
                                                       ("cpu", jnp.float32, "kernel")])
def test_block_terms_default_to_kernels_except_float32_on_gpu(monkeypatch, platform, dtype, expected):
    monkeypatch.setattr(path_block_sizes, "backend", lambda: platform)
    blocks = path_block_sizes.path_blocks(D, dtype)
    assert (blocks.preprocess, blocks.terms_backward) == (expected, expected)
    named = path_block_sizes.path_blocks(D, dtype, preprocess="kernel", terms_backward="xla")
    assert (named.preprocess, named.terms_backward) == ("kernel", "xla")
