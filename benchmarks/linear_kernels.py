"""Per-kernel milliseconds of the Gated DeltaNet, log-linear SSD and log-linear Gated DeltaNet Pallas kernels.

    python benchmarks/linear_kernels.py --ops gdn,loglinear_ssd,loglinear_gdn --shapes 4x4096,1x16384

Each kernel is timed alone in its own jit call on inputs made by the kernels before it (bf16, H heads of
K = V = dim, the per-backend default blocks), so a number includes one dispatch and the rows of one op do not
add up exactly to its forward+backward in ``linear_ops.py``. Use it to see where an op's time goes; T must be a
multiple of the kernels' chunk (64 on GPU).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear_ops import make_inputs  # noqa: E402
from peaks import median_seconds  # noqa: E402

KERNEL_OPS = ("gdn", "loglinear_ssd", "loglinear_gdn")


def milliseconds(function, *args) -> float:
    """Median ms of the jitted ``function(*args)`` (compiled and warmed up first)."""
    jitted = jax.jit(function)
    return 1e3 * median_seconds(lambda: jitted(*args), repeats=10)


def gdn_kernels(q, k, v, log_a, beta) -> list[tuple[str, float]]:
    """UT transform, the reverse state-cotangent pass and the per-chunk gradients of ``pallas_kernels.gdn``."""
    from pallas_kernels.gdn import gdn_blocks
    from pallas_kernels.gdn.api import _gdn_forward
    from pallas_kernels.gdn.kernel_bwd import state_cotangents
    from pallas_kernels.gdn.kernel_chunk_bwd import chunk_grads
    from pallas_kernels.gdn.kernel_ut import ut_transform

    batch, _, heads, dim = v.shape
    blocks = gdn_blocks(dim, dim)
    chunk = blocks.chunk
    initial = jnp.zeros((batch, heads, dim, dim), jnp.float32)
    states, w, decayed_keys, cum, pseudo, inverse = jax.jit(
        lambda *x: _gdn_forward(*x, initial, blocks, store_inverse=True)[1])(q, k, v, log_a, beta)
    beta32 = beta.astype(jnp.float32)
    d_out = jax.random.normal(jax.random.key(1), v.shape, v.dtype)

    def transform(k, v, beta, cum):
        return ut_transform(k, v, beta, cum, chunk=chunk, sub_block=blocks.sub_block,
                            num_warps=blocks.transform_warps, store_inverse=True)

    def cotangents(q, k, cum, w, decayed_keys, d_out):
        return state_cotangents(q, k, cum, w, decayed_keys, d_out, jnp.zeros_like(initial), chunk=chunk,
                                value_block=blocks.state_value_block, num_warps=blocks.state_warps,
                                num_stages=blocks.state_stages, cotangent_dtype=q.dtype)

    d_leaving = jax.jit(cotangents)(q, k, cum, w, decayed_keys, d_out)[0]

    def gradients(*args):
        return chunk_grads(*args, chunk=chunk, value_block=blocks.grad_value_block or dim,
                           float32_dots=blocks.grad_float32_dots, num_warps=blocks.grad_warps)

    return [("UT transform", milliseconds(transform, k, v, beta32, cum)),
            ("state cotangents", milliseconds(cotangents, q, k, cum, w, decayed_keys, d_out)),
            ("chunk gradients", milliseconds(gradients, q, k, v, pseudo, d_out, beta32, cum, inverse, states,
                                             d_leaving))]


def loglinear_ssd_kernels(q, k, v, log_a, lam) -> list[tuple[str, float]]:
    """Level inputs, level states, chunk outputs, reverse level cotangents, chunk gradients of
    ``pallas_kernels.loglinear``."""
    from pallas_kernels.loglinear.api import level_inputs
    from pallas_kernels.loglinear.blocks import loglinear_blocks
    from pallas_kernels.loglinear.kernel_bwd import chunk_grads, level_cotangents
    from pallas_kernels.loglinear.kernel_fwd import chunk_outputs, level_states

    blocks = loglinear_blocks(q.shape[-1], v.shape[-1])
    chunk = blocks.chunk
    levels = level_inputs(log_a, lam, chunk, 0)
    rows = (levels.cum, levels.lam_rows, levels.read_rows, levels.bucket_rows)
    counts = dict(in_chunk_levels=levels.in_chunk_levels, cross_levels=levels.cross_levels)
    d_out = jax.random.normal(jax.random.key(1), v.shape, v.dtype)

    def states_of(k, v, cum):
        return level_states(k, v, cum, chunk=chunk, key_block=blocks.key_block, value_block=blocks.value_block,
                            num_warps=blocks.state_num_warps)

    def outputs(q, k, v, cum, lam_rows, read_rows, states):
        return chunk_outputs(q, k, v, cum, lam_rows, read_rows, states, chunk=chunk,
                             value_block=blocks.output_value_block, num_warps=blocks.num_warps, **counts)

    def cotangents(q, d_out, cum, bucket_rows):
        return level_cotangents(q, d_out, cum, bucket_rows, chunk=chunk, cross_levels=levels.cross_levels,
                                key_block=blocks.key_block,
                                value_block=blocks.cotangent_value_block or blocks.value_block,
                                num_warps=blocks.state_num_warps)

    def gradients(q, k, v, d_out, cum, lam_rows, read_rows, states, d_states):
        return chunk_grads(q, k, v, d_out, cum, lam_rows, read_rows, states, d_states, chunk=chunk,
                           num_warps=blocks.num_warps, **counts)

    states = jax.jit(states_of)(k, v, levels.cum)
    d_states = jax.jit(cotangents)(q, d_out, levels.cum, levels.bucket_rows)
    return [("level inputs", milliseconds(lambda log_a, lam: tuple(level_inputs(log_a, lam, chunk, 0)[:4]),
                                          log_a, lam)),
            ("level states", milliseconds(states_of, k, v, levels.cum)),
            ("chunk outputs", milliseconds(outputs, q, k, v, *rows[:3], states)),
            ("level cotangents", milliseconds(cotangents, q, d_out, levels.cum, levels.bucket_rows)),
            ("chunk gradients", milliseconds(gradients, q, k, v, d_out, *rows[:3], states, d_states))]


def loglinear_gdn_kernels(q, k, v, log_a, beta, lam) -> list[tuple[str, float]]:
    """The backward kernels of ``pallas_kernels.loglinear_gdn`` on the forward's saved state."""
    from pallas_kernels.loglinear_gdn import api
    from pallas_kernels.loglinear_gdn.backward import chunk_levels
    from pallas_kernels.loglinear_gdn.blocks import loglinear_gdn_blocks
    from pallas_kernels.loglinear_gdn.kernel_bwd import level_cotangents, level_read_grads, transition_cotangents
    from pallas_kernels.loglinear_gdn.kernel_chunk_bwd import chunk_grads
    from pallas_kernels.loglinear_gdn.level_inputs import level_rows

    blocks = loglinear_gdn_blocks(q.shape[-1], v.shape[-1])
    chunk = blocks.chunk
    in_chunk, cross = chunk_levels(q.shape[1], chunk)
    _, saved = jax.jit(lambda *x: api._forward(*x, blocks, None, for_backward=True))(q, k, v, log_a, beta, lam)
    lam_rows = level_rows(lam, 0, in_chunk + cross)
    d_out = jax.random.normal(jax.random.key(1), v.shape, v.dtype)

    def cotangents(read_queries, d_out, w, decayed_keys, cum, lam_rows):
        return level_cotangents(read_queries, d_out, w, decayed_keys, cum, lam_rows, chunk=chunk,
                                in_chunk_levels=in_chunk,
                                value_block=blocks.cotangent_value_block or blocks.state_value_block,
                                cotangent_dtype=d_out.dtype, num_warps=blocks.state_warps)

    def transitions(carried, states):
        return transition_cotangents(carried, states, cross_levels=cross,
                                     key_block=blocks.transition_key_block or carried.shape[4],
                                     num_warps=blocks.output_warps)

    def reads(read_queries, d_out, lam_rows, states):
        return level_read_grads(read_queries, d_out, lam_rows, states, chunk=chunk, in_chunk_levels=in_chunk,
                                cross_levels=cross, value_block=blocks.output_value_block,
                                num_warps=blocks.output_warps)

    def gradients(*args):
        return chunk_grads(*args, chunk=chunk, in_chunk_levels=in_chunk, float32_dots=blocks.grad_float32_dots,
                           num_warps=blocks.grad_warps)

    level_args = (saved.read_queries, d_out, saved.w, saved.decayed_keys, saved.cum, lam_rows)
    carried, writes = jax.jit(cotangents)(*level_args)
    d_transitions = jax.jit(transitions)(carried, saved.states)
    d_queries, _ = jax.jit(reads)(saved.read_queries, d_out, lam_rows, saved.states)
    grad_args = (q, k, v, d_out, saved.w, saved.inverse, saved.beta, saved.cum, lam_rows, d_queries, d_transitions,
                 writes)
    return [("level cotangents", milliseconds(cotangents, *level_args)),
            ("transition cotangents", milliseconds(transitions, carried, saved.states)),
            ("level-read gradients", milliseconds(reads, saved.read_queries, d_out, lam_rows, saved.states)),
            ("chunk gradients", milliseconds(gradients, *grad_args))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(KERNEL_OPS), help=f"comma-separated subset of {KERNEL_OPS}")
    parser.add_argument("--shapes", default="4x4096,1x16384", help="BxT,BxT,...")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)
    timers = {"gdn": gdn_kernels, "loglinear_ssd": loglinear_ssd_kernels, "loglinear_gdn": loglinear_gdn_kernels}
    unknown = sorted(set(args.ops.split(",")) - set(KERNEL_OPS))
    if unknown:
        parser.error(f"--ops {unknown}: each must be one of {KERNEL_OPS}")
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  bf16, H={args.heads}, K=V={args.dim}")
    print(f"{'op':<16}{'B x T':>12}  {'kernel':<24}{'ms':>9}")
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        for op in args.ops.split(","):
            inputs = make_inputs(op, batch, length, args.heads, args.dim, jnp.bfloat16)
            for name, ms in timers[op](*inputs):
                print(f"{op:<16}{batch:>5} x {length:<6}  {name:<24}{ms:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
