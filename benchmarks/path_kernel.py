"""PaTH attention timings: forward and forward+backward ms of the Pallas kernel, the blockwise XLA form and
cuDNN causal flash attention, bf16, per (B, T, H, D).

    python benchmarks/path_kernel.py                               # the issue's four shapes
    python benchmarks/path_kernel.py --shapes 32x4096x32x64 --impls pallas,cudnn --json out.json

Each row is the median of repeats after warm-up (``benchmarks/peaks.median_seconds``); the loss of the
backward pass is ``sum(out²)``, differentiated wrt every input (q, k, v, w, β and, with ``--gate``, the log
forget gates). PaTH runs with H query heads and H KV heads, so it does the work of the same attention shape
plus the Householder terms. ``pallas_rebuild`` is the Pallas kernel with ``save_block_terms=False`` (less
residual memory, the backward builds the block terms again). The ``/cudnn`` columns are ratios to cuDNN flash
attention on the same shape; ``train MiB`` is the compiled forward+backward's temporary memory (residuals and
buffers, ``memory_analysis``). An impl that fails (no cuDNN on CPU, out of memory, no kernel) prints ``-`` and its
reason below the table.

Two more plain causal softmax attentions, from JAX's own Pallas kernels, show what flash attention itself reaches
on each Pallas GPU toolchain (the floor of a PaTH kernel built on it, which does that work and more):
``triton_flash`` (``jax.experimental.pallas.ops.gpu.attention.mha``, Triton lowering, the toolchain of the PaTH
kernels) and ``mosaic_flash`` (``attention_mgpu``, Mosaic GPU with Hopper warpgroup products; float16 only, so
its time includes casting q, k, v; forward only, its causal backward is not implemented).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peaks import median_seconds  # noqa: E402

from jaxlm.ops.path import path_attention  # noqa: E402

DEFAULT_SHAPES = "32x2048x32x64,32x4096x32x64,8x8192x32x64,4x16384x16x128"
IMPLS = ("pallas", "pallas_rebuild", "blockwise", "cudnn", "triton_flash", "mosaic_flash")


def make_inputs(batch: int, length: int, heads: int, dim: int, dtype, with_gate: bool) -> tuple:
    """Random ``(q, k, v, w, beta[, log_f])``: unit w, β in (0, 2), log forget gates near 0."""
    keys = jax.random.split(jax.random.key(0), 6)
    shape = (batch, length, heads, dim)
    q, k, v = (jax.random.normal(key, shape).astype(dtype) for key in keys[:3])
    w = jax.random.normal(keys[3], shape)
    w = (w / jnp.linalg.norm(w, axis=-1, keepdims=True)).astype(dtype)
    beta = 2.0 * jax.nn.sigmoid(jax.random.normal(keys[4], shape[:3]))
    inputs = (q, k, v, w, beta)
    if with_gate:
        inputs += (jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[5], shape[:3])),)
    return inputs


def impl_function(impl: str):
    """``inputs -> out`` of one impl (cuDNN reads only q, k, v)."""
    if impl == "cudnn":
        return lambda q, k, v, *_: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "pallas_rebuild":  # the backward builds the block terms again instead of reading the forward's
        from pallas_kernels.path import path_attention_pallas

        return lambda *inputs: path_attention_pallas(*inputs, save_block_terms=False)
    if impl == "triton_flash":
        from jax.experimental.pallas.ops.gpu import attention

        return lambda q, k, v, *_: attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)
    if impl == "mosaic_flash":
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        return lambda q, k, v, *_: attention_mgpu.attention(*(x.astype(jnp.float16) for x in (q, k, v)), config)
    return lambda *inputs: path_attention(*inputs, impl=impl)


def forward_ms(function, inputs, repeats: int) -> float:
    """Milliseconds of ``function(*inputs)``."""
    forward = jax.jit(function)
    return 1e3 * median_seconds(lambda: forward(*inputs), warmup=1, repeats=repeats)


def forward_backward_ms(function, inputs, repeats: int) -> tuple[float, float]:
    """(milliseconds, compiled temporary MiB) of the gradient of ``sum(function(*inputs)²)`` wrt every input
    (the temporaries hold the forward's residuals and the backward's buffers; ``memory_analysis``)."""
    differentiable = tuple(range(len(inputs)))
    train = jax.jit(jax.grad(lambda *x: jnp.sum(jnp.square(function(*x).astype(jnp.float32))), differentiable))
    temporary_mib = train.lower(*inputs).compile().memory_analysis().temp_size_in_bytes / 2 ** 20
    return 1e3 * median_seconds(lambda: train(*inputs), warmup=1, repeats=repeats), temporary_mib


def measure(shape: str, impls, with_gate: bool, repeats: int) -> list[dict]:
    """One row per impl for a ``BxTxHxD`` shape; failures keep their reason (a forward that runs keeps its
    time when the backward fails)."""
    batch, length, heads, dim = (int(x) for x in shape.split("x"))
    inputs = make_inputs(batch, length, heads, dim, jnp.bfloat16, with_gate)
    rows = []
    for impl in impls:
        row = dict(impl=impl, batch=batch, length=length, heads=heads, dim=dim, fwd_ms=math.nan,
                   fwd_bwd_ms=math.nan, train_mib=math.nan, error="")
        try:
            function = impl_function(impl)
            row["fwd_ms"] = forward_ms(function, inputs, repeats)
            row["fwd_bwd_ms"], row["train_mib"] = forward_backward_ms(function, inputs, repeats)
        except Exception as error:  # noqa: BLE001 - report the reason and go on with the other impls
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        rows.append(row)
    return with_cudnn_ratios(rows)


def with_cudnn_ratios(rows: list[dict]) -> list[dict]:
    """Add ``fwd_vs_cudnn`` / ``fwd_bwd_vs_cudnn``: each row's ms over the cuDNN row's (nan without one)."""
    reference = next((row for row in rows if row["impl"] == "cudnn"), None)
    for row in rows:
        row["fwd_vs_cudnn"] = row["fwd_ms"] / reference["fwd_ms"] if reference else math.nan
        row["fwd_bwd_vs_cudnn"] = row["fwd_bwd_ms"] / reference["fwd_bwd_ms"] if reference else math.nan
    return rows


def forward_breakdown(shape: str, variants: list[str], repeats: int) -> list[str]:
    """Forward ms of the XLA precomputation (blockwise terms and super-block keys in the kernel layout) and of
    the Pallas kernel alone, per ``block:num_warps:num_stages:superblock`` variant (0 = the default), on bf16
    inputs without gate."""
    from pallas_kernels.path.blocks import path_blocks, superblock_or_default
    from pallas_kernels.path.kernel_fwd import path_forward
    from pallas_kernels.path.layout import forward_layout

    batch, length, heads, dim = (int(x) for x in shape.split("x"))
    q, k, v, w, beta = make_inputs(batch, length, heads, dim, jnp.bfloat16, False)
    lines = []
    for variant in variants:
        block, num_warps, num_stages, superblock = (int(x) for x in (variant + ":0:0:0:0").split(":")[:4])
        try:
            blocks = path_blocks(dim, jnp.bfloat16, block, preprocess="xla")
            superblock = superblock_or_default(superblock or None, -(-length // block))
            precompute = jax.jit(lambda *x: forward_layout(*x, blocks, superblock))
            kernel_inputs = precompute(q, k, v, w, beta)
            kernel = jax.jit(lambda *x: path_forward(*x, block=block, superblock=superblock,
                                                     scale=dim ** -0.5, num_warps=num_warps or None,
                                                     num_stages=num_stages or blocks.num_stages))
            timed = {"warmup": 1, "repeats": repeats}
            precompute_ms = 1e3 * median_seconds(lambda: precompute(q, k, v, w, beta), **timed)
            kernel_ms = 1e3 * median_seconds(lambda: kernel(*kernel_inputs), **timed)
            prep_ms = pallas_preprocess_ms(k, w, beta, block, timed)
            lines.append(f"breakdown {shape} block={block} warps={num_warps} stages={num_stages} "
                         f"superblock={superblock}: precompute {precompute_ms:.2f} ms (Pallas "
                         f"block terms {prep_ms:.2f} ms), kernel {kernel_ms:.2f} ms")
        except Exception as error:  # noqa: BLE001 - report and go on with the other variants
            lines.append(f"breakdown {shape} {variant}: - {type(error).__name__}: {str(error)[:300]}")
        print(lines[-1], flush=True)
    return lines


def pallas_preprocess_ms(k, w, beta, block: int, timed: dict) -> float:
    """Milliseconds of the Pallas preprocessing kernel (𝒯, carried keys, block products) on padded inputs."""
    from pallas_kernels.path.kernel_prep import path_preprocess
    from pallas_kernels.path.layout import padded_time_major

    prep = jax.jit(lambda *x: path_preprocess(*(padded_time_major(a, block) for a in x), block=block,
                                              sub_block=min(32, block), float32_dots="tf32x3"))
    return 1e3 * median_seconds(lambda: prep(k, w, beta.astype(jnp.float32)), **timed)


def format_table(rows: list[dict]) -> str:
    """Rows as a fixed-width table, ``-`` for failed runs, then the failures' reasons."""
    def cell(value, width, digits):
        return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.{digits}f}"

    lines = [f"{'impl':<14}{'B x T x H x D':>22}{'fwd ms':>10}{'fwd+bwd':>10}{'fwd/cudnn':>11}{'f+b/cudnn':>11}"
             f"{'train MiB':>11}"]
    for row in rows:
        shape = f"{row['batch']} x {row['length']} x {row['heads']} x {row['dim']}"
        lines.append(f"{row['impl']:<14}{shape:>22}{cell(row['fwd_ms'], 10, 2)}{cell(row['fwd_bwd_ms'], 10, 2)}"
                     f"{cell(row['fwd_vs_cudnn'], 11, 2)}{cell(row['fwd_bwd_vs_cudnn'], 11, 2)}"
                     f"{cell(row.get('train_mib', math.nan), 11, 0)}")
    lines += [f"- {row['impl']} {row['batch']}x{row['length']}x{row['heads']}x{row['dim']}: {row['error']}"
              for row in rows if row["error"]]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxTxHxD,BxTxHxD,...")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--gate", action="store_true", help="time PaTH-FoX (with log forget gates)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="", help="write all rows here too")
    parser.add_argument("--breakdown", default="", help="block:num_warps:num_stages:superblock,... (0 = default): "
                        "time the precomputation and the kernel apart on the first shape, per variant")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"--impls: unknown {unknown}; allowed {IMPLS}")
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  bf16  gate={args.gate}", flush=True)
    if args.breakdown:
        forward_breakdown(args.shapes.split(",")[0], args.breakdown.split(","), args.repeats)
    rows = []
    for shape in args.shapes.split(","):
        rows += measure(shape, impls, args.gate, args.repeats)
        print(format_table(rows[-len(impls):]), flush=True)
    print("\n" + format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, file, indent=1)
    return rows


if __name__ == "__main__":
    main()
