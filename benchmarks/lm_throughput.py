"""Training throughput / MFU and batch-1 decode speed of a model config on one accelerator.

    python benchmarks/lm_throughput.py --config configs/bench/transformer_1b.py [--config.x=v ...]

Prints the measured ceilings (bf16 matmul TFLOP/s, memory GB/s), then
- training: tokens/s of the full jitted train step (forward, backward, AdamW) on random tokens, TFLOP/s counted as
  ``6·N·tokens + 6·L·T·H·D·tokens`` (N: parameters of every matmul, i.e. all but the input embedding table;
  the second term is causal attention's QKᵀ and AV products, forward + backward, with half the T×T
  scores masked), and MFU = TFLOP/s over the measured matmul peak;
- decode at batch 1: tokens/s of the jit-compiled decode loop with bf16 weights and unrolled layers (prefill excluded: two
  generation lengths are timed and differenced), against the memory roofline
  ``bandwidth / (bf16 weight bytes read per token + KV-cache bytes read per token)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peaks import matmul_peak_tflops, median_seconds, memory_bandwidth_gbs  # noqa: E402

from jaxlm.cli import parse_config_flags  # noqa: E402
from jaxlm.config import run_config_from_dict  # noqa: E402
from jaxlm.generate import generate  # noqa: E402
from jaxlm.models.decoder import DecoderLM  # noqa: E402
from jaxlm.parallel.mesh import make_mesh  # noqa: E402
from jaxlm.parallel.sharding import shard_batch  # noqa: E402
from jaxlm.train.optim import make_optimizer  # noqa: E402
from jaxlm.train.step import create_train_state, make_train_step  # noqa: E402


def matmul_params(model: DecoderLM) -> int:
    """Parameters that take part in a matmul per token: everything but the input embedding table."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return int(total - (0 if model.config.tie_embeddings else model.embed.embedding.size))


def train_flops_per_token(config, num_matmul_params: int, seq_len: int) -> float:
    """``6·N + 6·L·T·H·D``: dense matmuls plus causal attention scores and values, forward and backward."""
    attention_layers = sum(name == "attention" for name in config.layer_mixers())
    return 6 * num_matmul_params + 6 * attention_layers * seq_len * config.num_heads * config.resolved_head_dim


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    batch, length = config.data.batch_size, config.data.seq_len
    tokens = rng.integers(0, config.model.vocab_size, (batch, length + 1), dtype=np.int32)  # [B, T+1]
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions.copy(),
            "segment_ids": np.ones((batch, length), np.int32), "loss_mask": np.ones((batch, length), np.float32)}


def benchmark_training(config, steps: int) -> dict:
    mesh = make_mesh(config.mesh)
    model = DecoderLM(config.model, rngs=nnx.Rngs(0))
    num_matmul = matmul_params(model)
    optimizer = make_optimizer(config.optimizer, nnx.state(model, nnx.Param), config.train.steps)
    graphdef, state, shardings = create_train_state(model, optimizer, mesh)
    del model
    train_step = make_train_step(graphdef, optimizer, mesh, config.train, shardings)
    rng = np.random.default_rng(0)
    batches = [shard_batch(random_batch(config, rng), mesh) for _ in range(2)]
    holder = {"state": state}

    def one_step(index=[0]):
        index[0] += 1
        holder["state"], metrics = train_step(holder["state"], batches[index[0] % 2])
        return metrics["loss"]

    seconds = median_seconds(one_step, warmup=3, repeats=steps)
    tokens = config.data.batch_size * config.data.seq_len
    flops = train_flops_per_token(config.model, num_matmul, config.data.seq_len) * tokens
    return {"params": num_matmul, "step_ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12}


def benchmark_decode(config, prompt_length: int, new_tokens: int) -> dict:
    # Decode runs the layers unrolled: scanning over stacked weights costs about 2x per token at batch 1
    # (3.2 vs 1.7 ms for the 1B config on an H100, see BENCHMARKS.md); the function computed is the same.
    model = DecoderLM(dataclasses.replace(config.model, scan_layers=False), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    weight_bytes = 2 * matmul_params(model)
    prompt = np.random.default_rng(1).integers(0, config.model.vocab_size, prompt_length).tolist()

    def run(n):
        return lambda: jnp.asarray(generate(model, [prompt], max_new_tokens=n)[0])

    step_ms = single_decode_step_ms(model, prompt_length + new_tokens)
    short, long = new_tokens // 4, new_tokens
    seconds = (median_seconds(run(long), warmup=2, repeats=5) - median_seconds(run(short), warmup=2, repeats=5))
    per_token = seconds / (long - short)
    model_config = config.model
    mean_context = prompt_length + (short + long) / 2
    kv_bytes = 2 * 2 * model_config.num_layers * model_config.num_kv_heads * model_config.resolved_head_dim * mean_context
    return {"ms_per_token": per_token * 1e3, "tokens_per_s": 1 / per_token, "bytes_per_token": weight_bytes + kv_bytes,
            "single_step_ms": step_ms}


def single_decode_step_ms(model: DecoderLM, cache_length: int) -> float:
    """Median time of one jitted one-token ``model.decode`` call (outside any loop), for comparison."""
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, cache_length)

    @jax.jit
    def step(state, cache, token, position):
        return nnx.merge(graphdef, state).decode(token, positions=position, cache=cache)

    token, position = jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), 7, jnp.int32)
    return median_seconds(lambda: step(state, cache, token, position)[0], warmup=3, repeats=20) * 1e3


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--matmul-size", type=int, default=8192, help="n of the n×n×n peak-measuring product")
    parser.add_argument("--copy-bytes", type=int, default=2 << 30, help="size of the bandwidth-measuring pass")
    parser.add_argument("--decode-only", action="store_true", help="skip the training measurement")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args, overrides = parser.parse_known_args(argv)
    config = run_config_from_dict(parse_config_flags(args.config, overrides))

    device = jax.devices()[0]
    peak_tflops = matmul_peak_tflops(args.matmul_size)
    bandwidth = memory_bandwidth_gbs(args.copy_bytes)
    train = {"params": 0, "step_ms": 0.0, "tokens_per_s": 0.0, "tflops": 0.0}
    if not args.decode_only:
        train = benchmark_training(config, args.steps)
    decode = benchmark_decode(config, args.prompt_length, args.new_tokens)
    roofline = bandwidth * 1e9 / decode["bytes_per_token"]
    results = {"device": device.device_kind, "jax": jax.__version__, "peak_bf16_tflops": peak_tflops,
               "bandwidth_gbs": bandwidth, "train": train, "decode": decode, "mfu": train["tflops"] / peak_tflops,
               "decode_roofline_tokens_per_s": roofline, "decode_fraction_of_roofline": decode["tokens_per_s"] / roofline,
               "config": {"model": config.model.__dict__, "batch_size": config.data.batch_size,
                          "seq_len": config.data.seq_len}}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2, default=str)
    m = config.model
    print(f"\n{device.device_kind}, jax {jax.__version__}; model d={m.d_model} L={m.num_layers} H={m.num_heads}/"
          f"{m.num_kv_heads} mlp={m.mlp_dim} V={m.vocab_size}, {train['params'] / 1e9:.2f}B matmul params")
    print(f"| ceiling | measured |\n|---|---|\n| bf16 matmul | {peak_tflops:.0f} TFLOP/s |\n"
          f"| memory bandwidth | {bandwidth:.0f} GB/s |")
    print(f"\n| training (B={config.data.batch_size}, T={config.data.seq_len}) | value |\n|---|---|\n"
          f"| step | {train['step_ms']:.1f} ms |\n| tokens/s | {train['tokens_per_s']:,.0f} |\n"
          f"| model TFLOP/s | {train['tflops']:.1f} |\n| MFU (vs measured peak) | {100 * results['mfu']:.1f}% |")
    print(f"\n| decode (batch 1, prompt {args.prompt_length}) | value |\n|---|---|\n"
          f"| per token | {decode['ms_per_token']:.2f} ms |\n| one jitted decode call | {decode['single_step_ms']:.2f} ms |\n| tokens/s | {decode['tokens_per_s']:.1f} |\n"
          f"| roofline tokens/s | {roofline:.1f} |\n| fraction of roofline | "
          f"{100 * results['decode_fraction_of_roofline']:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
