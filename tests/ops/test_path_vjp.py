"""The linear-memory custom VJP of blockwise PaTH attention: its gradients against the naive form's
autodiff (float64), for several group sizes, with and without the gate and segments, and in bfloat16; the
memory benchmark's smoke run."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from jaxlm.ops.path import path_attention


def load_memory_benchmark():
    """``benchmarks/path_memory.py`` as a module (the benchmarks folder is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "path_memory.py"
    spec = importlib.util.spec_from_file_location("path_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

B, T, H, G, D = 2, 37, 4, 2, 5
BLOCK = 8  # 5 blocks, the last one partial
SEGMENT_LENGTHS = (11, 19, 7)  # boundaries inside blocks
ARGUMENT_NAMES = ("q", "k", "v", "w", "beta", "log_f")


def random_inputs(seed, dtype=np.float64):
    """q, k, v, unit w, beta with many values near 2 and near (or exactly) 1, log_f in (log 0.5, 0)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, D))
    k = rng.normal(size=(B, T, G, D))
    v = rng.normal(size=(B, T, G, D))
    w = rng.normal(size=(B, T, G, D))
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    beta = rng.uniform(0.05, 1.999, size=(B, T, G))
    beta[:, ::3] = rng.uniform(1.95, 1.999, size=beta[:, ::3].shape)  # close to reflections
    beta[:, 1::4] = rng.uniform(0.99, 1.01, size=beta[:, 1::4].shape)  # close to singular projections
    beta[:, 2::7] = 1.0  # exactly singular: I − w wᵀ has no inverse
    log_f = np.log(rng.uniform(0.5, 1.0, size=(B, T, H)))
    return tuple(x.astype(dtype) for x in (q, k, v, w, beta, log_f))


def gradients(inputs, cotangent, with_gate, segment_ids, **kwargs):
    """Gradients of ``sum(path_attention(...) · cotangent)`` wrt every input (log_f only with the gate)."""
    count = 6 if with_gate else 5

    def loss(*args):
        gate = args[5] if with_gate else None
        out = path_attention(*args[:5], gate, segment_ids=segment_ids, **kwargs)
        return jnp.sum(out.astype(cotangent.dtype) * cotangent)

    return jax.grad(loss, tuple(range(count)))(*inputs[:count])


@pytest.mark.parametrize("with_gate, with_segments, group_sizes", [
    (True, True, (1, 3)),  # 3 leaves a partial last group
    (False, False, (2, 8)),  # 8 > the number of blocks
], ids=["gate_segments", "no_gate_one_segment"])
def test_custom_vjp_gradients_match_naive_in_float64(with_gate, with_segments, group_sizes):
    """Every backward group size gives the naive form's gradients (β near 2, near and at 1; T % block ≠ 0)."""
    segment_ids = np.repeat(np.repeat(np.arange(3), SEGMENT_LENGTHS)[None], B, 0) if with_segments else None

    def every_form(inputs, cotangent, segments):
        naive = gradients(inputs, cotangent, with_gate, segments, impl="naive")
        grouped = [gradients(inputs, cotangent, with_gate, segments, block_size=BLOCK, backward_group_size=size)
                   for size in group_sizes]
        return naive, grouped

    with enable_x64(True):
        inputs = tuple(jnp.asarray(x) for x in random_inputs(0))
        cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, D)))
        segments = None if segment_ids is None else jnp.asarray(segment_ids)
        expected, found = jax.tree.map(np.asarray, jax.jit(every_form)(inputs, cotangent, segments))
    for size, grouped in zip(group_sizes, found):
        for name, grad_naive, grad_grouped in zip(ARGUMENT_NAMES, expected, grouped):
            assert grad_grouped.dtype == np.float64
            assert np.abs(grad_naive).max() > 1e-3, name
            np.testing.assert_allclose(grad_grouped, grad_naive, rtol=1e-9, atol=1e-9,
                                       err_msg=f"{name}, backward_group_size={size}")


def test_bfloat16_gradients_are_close_to_float32_naive():
    """bf16 q, k, v, w (β, log_f float32): gradients come back in each input's dtype and within 1e-2 of
    the float32 naive form's gradients on the same (rounded) values."""
    inputs = random_inputs(2, dtype=np.float32)
    low = tuple(jnp.asarray(x, jnp.bfloat16) for x in inputs[:4]) + tuple(jnp.asarray(x) for x in inputs[4:])
    high = tuple(x.astype(jnp.float32) for x in low)
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, H, D)), jnp.float32)
    run = jax.jit(lambda low, high: (gradients(low, cotangent, True, None, block_size=BLOCK, backward_group_size=2),
                                     gradients(high, cotangent, True, None, impl="naive")))
    found, expected = run(low, high)
    for name, source, grad_low, grad_high in zip(ARGUMENT_NAMES, low, found, expected):
        assert grad_low.dtype == source.dtype, name
        scale = float(jnp.abs(grad_high).max())
        assert scale > 1e-2, name
        np.testing.assert_allclose(np.asarray(grad_low, np.float32) / scale, np.asarray(grad_high) / scale,
                                   atol=1e-2, err_msg=name)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_backward_group_size_is_named(bad):
    q, k, v, w, beta, _ = (jnp.asarray(x) for x in random_inputs(0, dtype=np.float32))
    with pytest.raises(ValueError, match="backward_group_size must be a positive integer"):
        path_attention(q, k, v, w, beta, backward_group_size=bad)


def test_memory_benchmark_smoke_prints_a_table(capsys):
    """Compiled gradient temp memory at 256 tokens: the custom VJP below plain autodiff through the scan."""
    rows = load_memory_benchmark().main(["--smoke"])
    assert [row["T"] for row in rows] == [256]
    assert rows[0]["custom_vjp"] < 0.8 * rows[0]["autodiff"]
    assert "custom_vjp MiB" in capsys.readouterr().out
