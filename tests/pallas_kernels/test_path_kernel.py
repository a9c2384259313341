"""PaTH Pallas kernel (interpret mode on CPU) against the naive product form in float64: forward (with
super-blocks of several sizes) and every gradient, with and without the forget gate, segments, GQA, β near 2,
T not a multiple of the block, bf16; the keys carried to their super-block end against a loop;
shape errors; a run under TPU interpret semantics; the benchmark's table on a tiny shape."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from jax.experimental.pallas import tpu as pltpu

from jaxlm.ops.path import naive_path_attention, path_attention
from pallas_kernels.path import path_attention_pallas
from pallas_kernels.path.superblocks import keys_to_superblock_end, superblock_keys_kernel, superblock_keys_pullback
from pallas_kernels.registry import UnsupportedShapeError

D = 16


def random_inputs(seed, batch=2, length=37, heads=4, groups=2, dim=D):
    """float64 q, k, v, unit w, β in (0.05, 2) with every third near 2 and some exactly 1, log_f in (log ½, 0)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, dim))
    k = rng.normal(size=(batch, length, groups, dim))
    v = rng.normal(size=(batch, length, groups, dim))
    w = rng.normal(size=(batch, length, groups, dim))
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    beta = rng.uniform(0.05, 1.999, size=(batch, length, groups))
    beta[:, ::3] = rng.uniform(1.97, 1.999, size=beta[:, ::3].shape)  # close to reflections
    beta[:, 2::7] = 1.0  # singular projections
    log_f = np.log(rng.uniform(0.5, 1.0, size=(batch, length, heads)))
    return q, k, v, w, beta, log_f


def segments_of(lengths, batch=2):
    """``[B, T]`` int32 ids of contiguous segments of the given lengths."""
    return jnp.asarray(np.repeat(np.repeat(np.arange(len(lengths)), lengths)[None], batch, 0), jnp.int32)


def float64_reference(inputs, with_gate, segment_ids):
    with enable_x64():
        args = [jnp.asarray(x, jnp.float64) for x in inputs]
        gate = args[5] if with_gate else None
        out = naive_path_attention(*args[:5], gate, scale=D ** -0.5, segment_ids=segment_ids)
        return np.asarray(out)


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("length, heads, groups, with_gate, segment_lengths", [
    (37, 4, 2, True, None),  # 3 blocks, the last partial; GQA
    (37, 4, 2, False, (11, 19, 7)),  # segment boundaries inside blocks
    (7, 2, 1, True, (3, 4)),  # shorter than one block
    (48, 2, 2, True, (30, 18)),  # whole blocks
])
def test_forward_matches_float64_naive(length, heads, groups, with_gate, segment_lengths):
    inputs = random_inputs(length + heads, length=length, heads=heads, groups=groups)
    segment_ids = None if segment_lengths is None else segments_of(segment_lengths)
    args = [jnp.asarray(x, jnp.float32) for x in inputs]
    with jax.default_matmul_precision("float32"):  # the XLA precomputation: no TF32 on GPU
        out = path_attention_pallas(*args[:5], args[5] if with_gate else None, segment_ids, block_size=16)
    assert out.shape == inputs[0].shape and out.dtype == jnp.float32
    assert_close(out, float64_reference(inputs, with_gate, segment_ids), 2e-5)


@pytest.mark.parametrize("length, with_gate, segment_lengths, forward_superblock", [
    (117, True, (50, 40, 27), 3),  # 8 blocks: own super-block phase, two whole super-blocks, a partial last one
    (117, False, None, 1),  # a move per block, all through the super-block path
    (70, True, None, 2),  # 5 blocks
])
def test_forward_superblocks_match_float64_naive(length, with_gate, segment_lengths, forward_superblock):
    inputs = random_inputs(length + forward_superblock, length=length, heads=4, groups=2)
    segment_ids = None if segment_lengths is None else segments_of(segment_lengths)
    args = [jnp.asarray(x, jnp.float32) for x in inputs]
    with jax.default_matmul_precision("float32"):
        out = path_attention_pallas(*args[:5], args[5] if with_gate else None, segment_ids, block_size=16,
                                    forward_superblock=forward_superblock)
    assert_close(out, float64_reference(inputs, with_gate, segment_ids), 2e-5)


def test_keys_carried_to_superblock_end_match_sequential_products():
    """``K̂_j = K̄_j (P_{last} … P_{j+1})ᵀ`` and ``Φ = P_{last} … P_{first}`` per super-block, XLA and kernel,
    against a float64 loop over blocks, with 5 blocks in super-blocks of 2 (the last one partial)."""
    rng = np.random.default_rng(4)
    batch, groups, num_blocks, block, dim, superblock = 2, 3, 5, 16, 16, 2
    keys = rng.normal(size=(batch, groups, num_blocks * block, dim))
    products = rng.normal(size=(batch, groups, num_blocks, dim, dim)) / np.sqrt(dim)
    carried, whole = keys_to_superblock_end(jnp.asarray(keys, jnp.float32),
                                            jnp.asarray(products.reshape(batch, groups, -1, dim), jnp.float32),
                                            superblock)
    expected_keys = np.zeros_like(keys)
    expected_whole = np.zeros((batch, groups, 3, dim, dim))
    for first in range(0, num_blocks, superblock):
        later = np.broadcast_to(np.eye(dim), (batch, groups, dim, dim))
        for j in reversed(range(first, min(first + superblock, num_blocks))):
            rows = slice(j * block, (j + 1) * block)
            expected_keys[:, :, rows] = np.einsum("bgcd,bged->bgce", keys[:, :, rows], later)
            later = later @ products[:, :, j]
        expected_whole[:, :, first // superblock] = later
    assert_close(carried, expected_keys, 1e-5)
    assert_close(whole, expected_whole.reshape(batch, groups, -1, dim), 1e-5)
    with jax.default_matmul_precision("float32"):
        kernel_keys, kernel_whole = superblock_keys_kernel(jnp.asarray(keys, jnp.float32),
                                                           jnp.asarray(products.reshape(batch, groups, -1, dim),
                                                                       jnp.float32), superblock)
    assert kernel_keys.shape == (batch, groups, 6 * block, dim)  # whole super-blocks, zeros past the last block
    assert_close(kernel_keys[:, :, :num_blocks * block], expected_keys, 1e-5)
    assert not np.any(np.asarray(kernel_keys[:, :, num_blocks * block:]))
    assert_close(kernel_whole, expected_whole.reshape(batch, groups, -1, dim), 1e-5)


def test_superblock_keys_pullback_matches_vjp_of_xla_form():
    """The pullback kernel (with the suffixes stored by the forward kernel) against ``jax.vjp`` of the XLA
    ``keys_to_superblock_end``: 5 blocks in super-blocks of 2 (the last one partial) and of 8 (one partial)."""
    rng = np.random.default_rng(6)
    batch, groups, num_blocks, block, dim = 1, 2, 5, 16, 16
    keys = jnp.asarray(rng.normal(size=(batch, groups, num_blocks * block, dim)), jnp.float32)
    products = jnp.asarray(rng.normal(size=(batch, groups, num_blocks * dim, dim)) / np.sqrt(dim), jnp.float32)
    d_keys_at_end = jnp.asarray(rng.normal(size=keys.shape), jnp.float32)
    for superblock in (2, 8):
        num_superblocks = -(-num_blocks // superblock)
        d_whole = jnp.asarray(rng.normal(size=(batch, groups, num_superblocks * dim, dim)), jnp.float32)
        with jax.default_matmul_precision("float32"):
            _, vjp = jax.vjp(lambda k, p: keys_to_superblock_end(k, p, superblock), keys, products)
            expected = vjp((d_keys_at_end, d_whole))
            _, _, suffixes = superblock_keys_kernel(keys, products, superblock, with_suffixes=True)
            found = superblock_keys_pullback(keys, products, suffixes, d_keys_at_end, d_whole, superblock)
        for name, actual, wanted in zip(("dK", "dP"), found, expected):
            assert actual.shape == wanted.shape, name
            assert_close(actual, wanted, 1e-5)


def test_beta_zero_is_plain_causal_softmax_attention():
    q, k, v, w, beta, _ = (jnp.asarray(x, jnp.float32) for x in random_inputs(1, length=37, heads=4, groups=2))
    with jax.default_matmul_precision("float32"):
        out = path_attention_pallas(q, k, v, w, jnp.zeros_like(beta), block_size=16)
        expected = jax.nn.dot_product_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2),
                                                is_causal=True)
    assert_close(out, expected, 2e-5)


def test_all_gradients_match_float64_naive():
    inputs = random_inputs(7, batch=1, length=37, heads=2, groups=1)
    segment_ids = segments_of((20, 17), batch=1)
    cotangent = np.random.default_rng(8).normal(size=inputs[0].shape)

    def gradients(impl, args, cotangent):
        def loss(*a):
            out = path_attention(*a, segment_ids=segment_ids, impl=impl, block_size=16, backward_group_size=2)
            return jnp.sum(out * cotangent)

        return jax.grad(loss, tuple(range(6)))(*args)

    with jax.default_matmul_precision("float32"):
        found = jax.jit(lambda *a: gradients("pallas", a[:6], a[6]))(*(jnp.asarray(x, jnp.float32)
                                                                       for x in (*inputs, cotangent)))
    with enable_x64():
        expected = gradients("naive", [jnp.asarray(x) for x in inputs], jnp.asarray(cotangent))
        expected = [np.asarray(x) for x in expected]
    for name, actual, wanted in zip(("q", "k", "v", "w", "beta", "log_f"), found, expected):
        assert actual.shape == wanted.shape, name
        assert_close(actual, wanted, 1e-4)


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = random_inputs(3, length=37, heads=4, groups=2)
    as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in inputs[:4]] + [jnp.asarray(x, jnp.float32) for x in inputs[4:]]
    out = path_attention_pallas(*as_bf16, block_size=16)
    assert out.dtype == jnp.bfloat16
    rounded = [np.asarray(x, np.float64) for x in as_bf16]
    assert_close(out, float64_reference(rounded, True, None), 2e-2)


def test_op_dispatch_passes_scale_block_and_segments():
    args = [jnp.asarray(x, jnp.float32) for x in random_inputs(5, length=37, heads=4, groups=2)]
    segment_ids = segments_of((9, 28))
    with jax.default_matmul_precision("float32"):
        found = path_attention(*args, segment_ids=segment_ids, impl="pallas", block_size=16, scale=0.3)
        expected = path_attention_pallas(*args, segment_ids, block_size=16, scale=0.3)
    np.testing.assert_array_equal(np.asarray(found), np.asarray(expected))
    with enable_x64():
        wide = [jnp.asarray(x, jnp.float64) for x in args]
        reference = naive_path_attention(*wide, scale=0.3, segment_ids=segment_ids)
    assert_close(found, reference, 2e-5)


def test_unsupported_shapes_and_dtypes_raise_clear_errors():
    args = [jnp.asarray(x, jnp.float32) for x in random_inputs(0, length=8, heads=1, groups=1, dim=24)]
    with pytest.raises(UnsupportedShapeError, match="head_dim=24 must be a power of two >= 16"):
        path_attention(*args, impl="pallas")
    args = [jnp.asarray(x, jnp.float32) for x in random_inputs(0, length=8, heads=1, groups=1)]
    with pytest.raises(UnsupportedShapeError, match="block_size=24 must be a power of two >= 16"):
        path_attention(*args, impl="pallas", block_size=24)
    with pytest.raises(UnsupportedShapeError, match="dtype=float16"):
        path_attention(*(x.astype(jnp.float16) for x in args), impl="pallas", block_size=16)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="TPU interpret mode is run on the CPU backend")
def test_tpu_interpret_semantics():
    """The kernel's tiles (whole head dim x block rows, whole-length gate rows) under TPU interpret mode."""
    inputs = random_inputs(9, batch=1, length=29, heads=1, groups=1)
    segment_ids = segments_of((20, 9), batch=1)
    out = path_attention_pallas(*(jnp.asarray(x, jnp.float32) for x in inputs), segment_ids, block_size=16,
                                interpret=pltpu.InterpretParams(), forward_superblock=1)
    assert_close(out, float64_reference(inputs, True, segment_ids), 2e-5)


def load_benchmark():
    """``benchmarks/path_kernel.py`` as a module (the benchmarks folder is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "path_kernel.py"
    spec = importlib.util.spec_from_file_location("path_kernel_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_table_marks_failed_impls():
    module = load_benchmark()
    rows = [dict(impl="pallas", batch=1, length=32, heads=2, dim=16, fwd_ms=3.0, fwd_bwd_ms=12.0, error=""),
            dict(impl="cudnn", batch=1, length=32, heads=2, dim=16, fwd_ms=2.0, fwd_bwd_ms=4.0, error="")]
    rows = module.with_cudnn_ratios(rows)
    assert rows[0]["fwd_vs_cudnn"] == 1.5 and rows[0]["fwd_bwd_vs_cudnn"] == 3.0
    failed = module.measure("1x32x2x16", ("no_such_impl",), False, 1)
    assert failed[0]["error"] and np.isnan(failed[0]["fwd_ms"])
    table = module.format_table(rows + failed)
    assert "1.50" in table and "3.00" in table and f"- {failed[0]['impl']} 1x32x2x16:" in table
