"""Gradient memory of blockwise PaTH attention: plain autodiff through the forward scan vs the custom VJP.

    python benchmarks/path_memory.py [--lengths 1024 2048 4096 8192] [--heads 2] [--dim 64] [--block 64]
                                     [--group-size 4] [--time] [--smoke]

For each sequence length T, compiles ``jax.jit(jax.grad(loss))`` of ``loss = Σ path_attention(q, k, v, w, β,
log_f) · c`` (float32, B=1, H KV heads = H query heads, with the forget gate) and prints the compiled temp
bytes from ``memory_analysis()`` and their growth per doubling of T: plain autodiff keeps every scan step's
moved queries (O(T²/C · D), ~4× per doubling), the custom VJP keeps O(S·C·T·D) (~2×). ``--time`` adds
the median wall time of the forward and of the gradient for both (runs them; meant for a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peaks import median_seconds  # noqa: E402

from jaxlm.ops.path_blockwise import blockwise_path_attention  # noqa: E402
from jaxlm.ops.path_blockwise_vjp import path_attention_linear_memory  # noqa: E402

IMPLS = ("autodiff", "custom_vjp")


def attention_fn(impl: str, block_size: int, group_size: int):
    """``(q, k, v, w, beta, log_f) -> out`` for one backward implementation (scale ``D^{-1/2}``)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def attend(q, k, v, w, beta, log_f):
        scale = q.shape[-1] ** -0.5
        if impl == "autodiff":
            return blockwise_path_attention(q, k, v, w, beta, log_f, scale, block_size, None)
        return path_attention_linear_memory(q, k, v, w, beta, log_f, None, scale, block_size, group_size)

    return attend


def input_shapes(length: int, batch_size: int, num_heads: int, dim: int):
    """Abstract float32 ``(q, k, v, w, beta, log_f)`` for ``[B, T, H, D]`` (as many KV heads as query heads)."""
    vector = jax.ShapeDtypeStruct((batch_size, length, num_heads, dim), jnp.float32)
    scalar = jax.ShapeDtypeStruct((batch_size, length, num_heads), jnp.float32)
    return (vector, vector, vector, vector, scalar, scalar)


def gradient_fn(impl: str, block_size: int, group_size: int):
    """Gradient wrt all six inputs of ``Σ out`` (a sum is enough: the cotangent is dense either way)."""
    attend = attention_fn(impl, block_size, group_size)
    return jax.grad(lambda *args: jnp.sum(attend(*args)), argnums=tuple(range(6)))


def gradient_temp_bytes(impl: str, length: int, *, batch_size: int = 1, num_heads: int = 2, dim: int = 64,
                        block_size: int = 64, group_size: int = 4) -> int:
    """Temp bytes of the compiled gradient program (``memory_analysis().temp_size_in_bytes``)."""
    compiled = jax.jit(gradient_fn(impl, block_size, group_size)).lower(
        *input_shapes(length, batch_size, num_heads, dim)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def random_inputs(length: int, batch_size: int, num_heads: int, dim: int):
    """Concrete inputs: normal q, k, v; unit w; β ∈ (0, 2); log_f ∈ (log 0.9, 0)."""
    keys = jax.random.split(jax.random.key(0), 6)
    shapes = input_shapes(length, batch_size, num_heads, dim)
    q, k, v, w = (jax.random.normal(key, shape.shape) for key, shape in zip(keys[:4], shapes[:4]))
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    beta = jax.random.uniform(keys[4], shapes[4].shape, minval=0.0, maxval=2.0)
    log_f = jnp.log(jax.random.uniform(keys[5], shapes[5].shape, minval=0.9, maxval=1.0))
    return q, k, v, w, beta, log_f


def timings(impl: str, length: int, batch_size: int, num_heads: int, dim: int, block_size: int,
            group_size: int) -> tuple[float, float]:
    """Median seconds of the jitted forward and of the jitted gradient."""
    inputs = random_inputs(length, batch_size, num_heads, dim)
    forward = jax.jit(attention_fn(impl, block_size, group_size))
    gradient = jax.jit(gradient_fn(impl, block_size, group_size))
    return (median_seconds(lambda: forward(*inputs), warmup=2, repeats=5),
            median_seconds(lambda: gradient(*inputs), warmup=2, repeats=5))


def memory_table(lengths, *, batch_size: int, num_heads: int, dim: int, block_size: int, group_size: int,
                 with_times: bool = False) -> list[dict]:
    """One row per T: temp MiB of both gradients, their growth over the previous T, optional times."""
    rows = []
    for length in lengths:
        row = {"T": length}
        for impl in IMPLS:
            row[impl] = gradient_temp_bytes(impl, length, batch_size=batch_size, num_heads=num_heads, dim=dim,
                                            block_size=block_size, group_size=group_size)
            if rows:
                row[f"{impl}_growth"] = row[impl] / rows[-1][impl]
            if with_times:
                row[f"{impl}_forward_s"], row[f"{impl}_gradient_s"] = timings(
                    impl, length, batch_size, num_heads, dim, block_size, group_size)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of ``memory_table`` rows."""
    header = f"{'T':>7} | {'autodiff MiB':>12} {'x':>5} | {'custom_vjp MiB':>14} {'x':>5}"
    with_times = "autodiff_forward_s" in rows[0]
    if with_times:
        header += " | fwd s (autodiff, vjp) | grad s (autodiff, vjp)"
    lines = [header, "-" * len(header)]
    for row in rows:
        line = (f"{row['T']:>7} | {row['autodiff'] / 2**20:>12.1f} {row.get('autodiff_growth', float('nan')):>5.2f}"
                f" | {row['custom_vjp'] / 2**20:>14.1f} {row.get('custom_vjp_growth', float('nan')):>5.2f}")
        if with_times:
            line += (f" | {row['autodiff_forward_s']:>9.4f} {row['custom_vjp_forward_s']:>9.4f}"
                     f"   | {row['autodiff_gradient_s']:>9.4f} {row['custom_vjp_gradient_s']:>9.4f}")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--time", action="store_true", help="also time forward and gradient (runs them)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU sizes: T 256; H 1; D 8; block 16")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.dim, args.block, args.group_size = [256], 1, 8, 16, 2
    print(f"backend {jax.default_backend()}: B={args.batch} H={args.heads} D={args.dim} block={args.block} "
          f"backward group size={args.group_size}; x = growth over the previous T", flush=True)
    rows = memory_table(args.lengths, batch_size=args.batch, num_heads=args.heads, dim=args.dim,
                        block_size=args.block, group_size=args.group_size, with_times=args.time)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
