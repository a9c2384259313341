"""Measured hardware ceilings, taken in the same run as the benchmark they normalise.

- bf16 matmul peak: an 8192 x 8192 x 8192 product (2·n³ FLOPs) on random data, median time.
- memory bandwidth: y = x * 1.0001 over a large float32 array, counting bytes read plus bytes written.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable[[], jax.Array], *, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``fn()`` (blocking on its result) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def matmul_peak_tflops(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """Achieved TFLOP/s of an n×n×n product in ``dtype``."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)  # [n, n]
    b = jax.random.normal(key_b, (n, n), dtype)  # [n, n]
    product = jax.jit(lambda x, y: x @ y)
    seconds = median_seconds(lambda: product(a, b))
    return 2 * n**3 / seconds / 1e12


def memory_bandwidth_gbs(num_bytes: int = 2 << 30) -> float:
    """Achieved GB/s of a scale-by-constant pass (read + write) over ``num_bytes`` of float32."""
    x = jax.random.normal(jax.random.key(1), (num_bytes // 4,), jnp.float32)
    scale = jax.jit(lambda v: v * 1.0001)
    seconds = median_seconds(lambda: scale(x))
    return 2 * num_bytes / seconds / 1e9
