"""Linear-family op timings: forward and forward+backward ms per impl and shape, vs cuDNN flash attention.

    python benchmarks/linear_ops.py                      # the issue's shapes (bf16, H=16, K=V=128, 16K tokens)
    python benchmarks/linear_ops.py --ops ssd --shapes 1x16384 --impls pallas,chunked

For each op (ssd, gdn, loglinear_ssd, loglinear_gdn) and (B, T) it prints forward and forward+backward
milliseconds (median of repeats after warm-up), achieved TFLOP/s against the bf16 matmul peak measured in
the same run, and the ratio to cuDNN causal flash attention on the same shape (H heads of dim K). FLOPs are
the chunked algorithm's matmul FLOPs (backward counted as 2x forward); attention's are ``2·T²·D·H·B``
forward (causal half of ``4·T²·D``). An impl that cannot run (e.g. no Pallas kernel for the op, or no
cuDNN on CPU) prints ``-`` with its reason in the log.

    python benchmarks/linear_ops.py --ops ssd --shapes 1x16384 --impls pallas --ssd-blocks 64:64:64:64:4,128:64:64:64:8

``--ssd-blocks`` times the SSD Pallas kernels with each block choice ``chunk:key_block:value_block:
output_value_block:num_warps[:state_num_warps[:state_num_stages]]`` (0: the Pallas default): the op's forward
and forward+backward, and each kernel alone (chunk states, chunk outputs, state cotangents, chunk gradients),
to see where the time goes. T must be a multiple of the chunk there.

    python benchmarks/linear_ops.py --ops loglinear_ssd,loglinear_gdn --shapes 1x16384 --segments 8

``--segments S`` packs every row with S segments cut at random points (seeded) and passes them as
``segment_ids`` to the ops (cuDNN attention stays unmasked, as the reference point).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peaks import matmul_peak_tflops, median_seconds  # noqa: E402

from jaxlm import ops  # noqa: E402

DEFAULT_SHAPES = "8x2048,4x4096,2x8192,1x16384,1x32768"
OPS = ("ssd", "gdn", "loglinear_ssd", "loglinear_gdn")


def make_inputs(op: str, batch: int, length: int, heads: int, dim: int, dtype) -> tuple:
    """Random op inputs ``(q, k, v, log_a[, beta][, lam])`` with unit-norm keys and moderate decays."""
    keys = jax.random.split(jax.random.key(0), 6)
    q = (jax.random.normal(keys[0], (batch, length, heads, dim)) / np.sqrt(dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, heads, dim))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, heads, dim)).astype(dtype)
    log_a = -jax.random.uniform(keys[3], (batch, length, heads), minval=0.001, maxval=0.1)
    beta = jax.random.uniform(keys[4], (batch, length, heads), minval=0.1, maxval=0.9)
    levels = (length - 1).bit_length() + 1
    lam = jax.random.uniform(keys[5], (batch, length, heads, levels), minval=0.5, maxval=1.5)
    inputs = {"ssd": (q, k, v, log_a), "gdn": (q, k, v, log_a, beta),
              "loglinear_ssd": (q, k, v, log_a, lam), "loglinear_gdn": (q, k, v, log_a, beta, lam)}
    return inputs[op]


def random_segment_ids(batch: int, length: int, segments: int, seed: int = 0) -> jax.Array:
    """``[B, T]`` int32 ids of ``segments`` segments per row, cut at distinct uniformly random points."""
    if not 1 <= segments <= length:
        raise ValueError(f"--segments must be in [1, T={length}], got {segments}")
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    for row in ids:
        for cut in rng.choice(np.arange(1, length), segments - 1, replace=False):
            row[cut:] += 1
    return jnp.asarray(ids)


def op_function(op: str, impl: str, segment_ids: jax.Array | None = None):
    """``inputs -> outputs`` of ``op`` with ``impl`` (on packed rows given ``segment_ids``)."""
    function = {"ssd": ops.ssd, "gdn": ops.gated_delta_rule, "loglinear_ssd": ops.loglinear_ssd,
                "loglinear_gdn": ops.loglinear_gated_delta_rule}[op]
    if segment_ids is None:
        return lambda *inputs: function(*inputs, impl=impl)
    return lambda *inputs: function(*inputs, impl=impl, segment_ids=segment_ids)


def attention_function():
    """cuDNN causal flash attention on ``(q, k, v)`` of the same shape."""
    return lambda q, k, v, *_: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def forward_and_train_ms(function, inputs) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ``function(*inputs)`` with loss ``sum(out²)``."""
    forward = jax.jit(function)
    differentiable = tuple(range(len(inputs)))
    train = jax.jit(jax.grad(lambda *x: jnp.sum(jnp.square(function(*x).astype(jnp.float32))), differentiable))
    return 1e3 * median_seconds(lambda: forward(*inputs)), 1e3 * median_seconds(lambda: train(*inputs))


def linear_flops(op: str, batch: int, length: int, heads: int, dim: int, chunk: int = 64) -> float:
    """Forward matmul FLOPs of the chunked algorithm: ``2C(K+V) + 4KV`` per token and head (+ the UT
    transform's ``2C·K + C²·V`` for the delta rule); log-linear ops multiply the inter-chunk part by levels."""
    per_token = 2 * chunk * 2 * dim + 4 * dim * dim
    if op in ("gdn", "loglinear_gdn"):
        per_token += 2 * chunk * dim + chunk * dim
    if op.startswith("loglinear"):
        per_token += 4 * dim * dim * ((length - 1).bit_length())
    return float(per_token * batch * length * heads)


def parse_ssd_blocks(text: str):
    """``"64:64:64:64:4,64:32:64:64:4:4:2,..."`` -> list of ``SSDBlocks`` (GPU layout)."""
    from pallas_kernels.ssd.blocks import SSDBlocks

    variants = []
    for item in filter(None, text.split(",")):
        chunk, key_block, value_block, output_value_block, warps, state_warps, state_stages = (
            [int(x) for x in item.split(":")] + [0, 0])[:7]
        variants.append(SSDBlocks(chunk=chunk, key_block=key_block, value_block=value_block,
                                  output_value_block=output_value_block, num_warps=warps or None,
                                  state_num_warps=state_warps or None, state_num_stages=state_stages or None))
    return variants


def ssd_kernel_ms(blocks, batch: int, length: int, heads: int, dim: int, dtype) -> dict:
    """Milliseconds of the SSD op (forward, forward+backward) on ``blocks`` and of each of its four kernels
    (each kernel timed alone in its own jit call, so its number includes one dispatch)."""
    from pallas_kernels.ssd import kernel_bwd, kernel_fwd, ssd_pallas
    from pallas_kernels.ssd.api import within_chunk_cumsum

    q, k, v, log_a = make_inputs("ssd", batch, length, heads, dim, dtype)
    initial = jnp.zeros((batch, heads, dim, dim), jnp.float32)
    fwd_ms, fwd_bwd_ms = forward_and_train_ms(
        lambda *x: ssd_pallas(*x, initial, blocks=blocks)[0], (q, k, v, log_a))
    chunk = blocks.chunk
    if length % chunk:
        raise ValueError(f"per-kernel timings need T={length} to be a multiple of the chunk {chunk}")
    cum = within_chunk_cumsum(log_a, chunk, 0)  # [B, H, T]
    sequential = dict(chunk=chunk, value_block=blocks.value_block, key_block=blocks.key_block, time_major=True,
                      num_warps=blocks.state_num_warps, num_stages=blocks.state_num_stages)
    states_fn = jax.jit(lambda k, v: kernel_fwd.chunk_states(k, v, cum, initial, **sequential))
    states, _ = states_fn(k, v)
    outputs_fn = jax.jit(lambda q, k, v: kernel_fwd.chunk_outputs(
        q, k, v, cum, states, chunk=chunk, value_block=blocks.output_value_block, num_warps=blocks.num_warps,
        time_major=True))
    state_grads_fn = jax.jit(lambda q, dout: kernel_bwd.chunk_state_grads(q, dout, cum, initial, **sequential))
    dstates, _ = state_grads_fn(q, v)
    grads_fn = jax.jit(lambda q, k, v: kernel_bwd.chunk_grads(
        q, k, v, v, cum, states, dstates, chunk=chunk, num_warps=blocks.num_warps, time_major=True))
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                states_ms=1e3 * median_seconds(lambda: states_fn(k, v)),
                outputs_ms=1e3 * median_seconds(lambda: outputs_fn(q, k, v)),
                state_grads_ms=1e3 * median_seconds(lambda: state_grads_fn(q, v)),
                grads_ms=1e3 * median_seconds(lambda: grads_fn(q, k, v)))


def print_ssd_block_table(args, dtype) -> None:
    """One row per (shape, block choice): op and per-kernel milliseconds."""
    columns = ("fwd_ms", "fwd_bwd_ms", "states_ms", "outputs_ms", "state_grads_ms", "grads_ms")
    lines = [f"{'B x T':>12}  {'chunk:kb:vb:ovb:w:sw:ss':<24}" + "".join(f"{c:>15}" for c in columns)]
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        for blocks in parse_ssd_blocks(args.ssd_blocks):
            name = ":".join(str(x or 0) for x in (blocks.chunk, blocks.key_block, blocks.value_block,
                                                  blocks.output_value_block, blocks.num_warps,
                                                  blocks.state_num_warps, blocks.state_num_stages))
            try:
                times = ssd_kernel_ms(blocks, batch, length, args.heads, args.dim, dtype)
            except Exception as error:  # noqa: BLE001 - a block choice that does not compile: report, go on
                print(f"  ssd blocks {name} {shape}: {type(error).__name__}: {str(error)[:300]}")
                continue
            lines.append(f"{batch:>5} x {length:<6}  {name:<24}" + "".join(f"{times[c]:>15.3f}" for c in columns))
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--impls", default="pallas,chunked")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxT,BxT,...")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--json", default="", help="write all rows here too")
    parser.add_argument("--peak-size", type=int, default=8192, help="n of the n×n×n bf16 peak product")
    parser.add_argument("--ssd-blocks", default="", help="chunk:kb:vb:ovb:warps,... (SSD kernel block table)")
    parser.add_argument("--segments", type=int, default=0, help="pack every row with this many segments")
    args = parser.parse_args(argv)
    dtype = jnp.bfloat16
    if args.ssd_blocks:
        print_ssd_block_table(args, dtype)
        return
    peak = matmul_peak_tflops(args.peak_size)
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  bf16 matmul peak {peak:.0f} TFLOP/s"
          + (f"  packed rows: {args.segments} segments" if args.segments else ""))
    rows = []
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        q, k, v = make_inputs("ssd", batch, length, args.heads, args.dim, dtype)[:3]
        try:
            attention_ms = forward_and_train_ms(attention_function(), (q, k, v))
        except Exception as error:  # noqa: BLE001 - no cuDNN on this backend: report and go on
            print(f"  cudnn attention {shape}: {type(error).__name__}: {str(error)[:200]}")
            attention_ms = (float("nan"), float("nan"))
        attention_flops = 2.0 * length * length * args.dim * args.heads * batch
        rows.append(dict(op="cudnn_attention", impl="cudnn", batch=batch, length=length, fwd_ms=attention_ms[0],
                         fwd_bwd_ms=attention_ms[1], tflops=attention_flops / attention_ms[0] / 1e9))
        segment_ids = random_segment_ids(batch, length, args.segments) if args.segments else None
        for op in args.ops.split(","):
            inputs = make_inputs(op, batch, length, args.heads, args.dim, dtype)
            for impl in args.impls.split(","):
                try:
                    fwd_ms, fwd_bwd_ms = forward_and_train_ms(op_function(op, impl, segment_ids), inputs)
                except Exception as error:  # noqa: BLE001 - e.g. no kernel for this op yet
                    print(f"  {op}/{impl} {shape}: {type(error).__name__}: {str(error)[:200]}")
                    continue
                flops = linear_flops(op, batch, length, args.heads, args.dim)
                rows.append(dict(op=op, impl=impl, batch=batch, length=length, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                                 tflops=flops / fwd_ms / 1e9, vs_attention=fwd_bwd_ms / attention_ms[1]))
    print(f"\n{'op':<16}{'impl':<9}{'B x T':>12}{'fwd ms':>9}{'fwd+bwd':>9}{'TFLOP/s':>9}{'%peak':>7}{'/attn':>7}")
    for row in rows:
        ratio = row.get("vs_attention", float("nan"))
        print(f"{row['op']:<16}{row['impl']:<9}{row['batch']:>5} x {row['length']:<6}{row['fwd_ms']:>9.3f}"
              f"{row['fwd_bwd_ms']:>9.3f}{row['tflops']:>9.1f}{100 * row['tflops'] / peak:>7.1f}{ratio:>7.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "peak_tflops": peak,
                       "segments": args.segments, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
