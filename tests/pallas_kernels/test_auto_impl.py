"""``impl="auto"``: the Pallas kernels on a GPU when they take the inputs, the XLA path otherwise
(``pallas_kernels.registry.kernels_unless_unsupported``). The GPU is simulated by patching the registry's
``backend``; the kernels still run in interpret mode on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.loglinear import loglinear_ssd
from jaxlm.ops.path import path_attention
from pallas_kernels import registry
from pallas_kernels.registry import UnsupportedShapeError, kernels_unless_unsupported


def _unsupported():
    raise UnsupportedShapeError("no kernel for this shape")


def _broken():
    raise ValueError("a bug, not an unsupported shape")


@pytest.mark.parametrize("platform, expected", [("gpu", "kernels"), ("tpu", "xla"), ("cpu", "xla")])
def test_rule_picks_kernels_only_on_gpu(monkeypatch, platform, expected):
    monkeypatch.setattr(registry, "backend", lambda: platform)
    assert kernels_unless_unsupported(lambda: "kernels", lambda: "xla") == expected


def test_rule_falls_back_on_unsupported_shapes_only(monkeypatch):
    monkeypatch.setattr(registry, "backend", lambda: "gpu")
    assert kernels_unless_unsupported(_unsupported, lambda: "xla") == "xla"
    with pytest.raises(ValueError, match="a bug"):
        kernels_unless_unsupported(_broken, lambda: "xla")


def _path_inputs(dim: int):
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (1, 20, 1, dim)) for key in keys[:3])
    w = jax.random.normal(keys[3], (1, 20, 1, dim))
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    beta = 2.0 * jax.nn.sigmoid(jax.random.normal(keys[4], (1, 20, 1)))
    return q, k, v, w, beta


@pytest.mark.parametrize("dim, expected_impl", [(16, "pallas"), (12, "blockwise")])
def test_path_attention_auto_on_gpu(monkeypatch, dim, expected_impl):
    """Head dim 16: the kernels; 12 (not a power of two): the blockwise form."""
    monkeypatch.setattr(registry, "backend", lambda: "gpu")
    inputs = _path_inputs(dim)
    calls = []
    import pallas_kernels.path as path_kernels

    original = path_kernels.path_attention_pallas

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(path_kernels, "path_attention_pallas", counted)
    with jax.default_matmul_precision("highest"):  # XLA:GPU would otherwise use TF32 in the XLA products
        auto = path_attention(*inputs, impl="auto", block_size=16)
        expected = path_attention(*inputs, impl=expected_impl, block_size=16)
    assert len(calls) == 1 + (expected_impl == "pallas")  # auto tried the kernels; the 12-dim call fell back
    np.testing.assert_allclose(np.asarray(auto), np.asarray(expected), atol=1e-5, rtol=0)


def test_loglinear_auto_takes_the_kernels_for_segment_ids(monkeypatch):
    monkeypatch.setattr(registry, "backend", lambda: "gpu")
    rng = np.random.default_rng(1)
    length, levels = 24, 6
    q, k, v = (jnp.asarray(rng.normal(size=(1, length, 1, 16)), jnp.float32) for _ in range(3))
    log_a = jnp.asarray(-rng.uniform(0.01, 0.3, size=(1, length, 1)), jnp.float32)
    lam = jnp.asarray(rng.uniform(0.5, 1.5, size=(1, length, 1, levels)), jnp.float32)
    segments = jnp.asarray(np.repeat([0, 1], [10, length - 10])[None], jnp.int32)
    with jax.default_matmul_precision("highest"):  # XLA:GPU would otherwise use TF32 in the XLA products
        auto = loglinear_ssd(q, k, v, log_a, lam, impl="auto", segment_ids=segments)
        kernels = loglinear_ssd(q, k, v, log_a, lam, impl="pallas", segment_ids=segments)
        chunked = loglinear_ssd(q, k, v, log_a, lam, impl="chunked", segment_ids=segments)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(kernels))
    np.testing.assert_allclose(np.asarray(auto), np.asarray(chunked), atol=1e-5, rtol=0)
    no_segments = loglinear_ssd(q, k, v, log_a, lam, impl="auto")
    kernels = loglinear_ssd(q, k, v, log_a, lam, impl="pallas")
    np.testing.assert_array_equal(np.asarray(no_segments), np.asarray(kernels))
