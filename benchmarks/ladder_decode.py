"""Decode throughput of the four residual modes under tensor parallelism (Ladder-residual paper protocol).

For every tensor-parallel size TP (devices of this host, mesh ``(1, 1, TP)``), batch size and residual
mode: prefill a random prompt of ``--prompt`` tokens, then greedily decode ``--new`` tokens with the KV
cache in one jitted ``lax.fori_loop``. Weights are random (bfloat16); times are the median of
``--repeats`` runs after a warm-up. The decode function is compiled with
``jaxlm.models.ladder.decode_compiler_options()`` (the all-reduce combiner off on GPU). All programs of
one TP are compiled ahead of time in ``--compile-threads`` threads (XLA compiles without the GIL), so
a full sweep spends its time measuring rather than compiling.

Columns: prefill ms, decode ms, decode tokens/s = ``B * (new - 1) / decode time``, end-to-end tokens/s =
``B * new / (prefill + decode time)``, and the speed-up of decode tokens/s over ``standard``.
``--allreduce`` adds, per TP and batch, the time of one all-reduce of a ``[B, 1, d_model]`` bfloat16
partial sum (the only communication of a decode module): ``2 L`` of them per token is the communication
that the ladder tries to hide, and ``standard - upper_bound`` is how much of it is exposed.

    python benchmarks/ladder_decode.py                         # 1B-shaped model, TP 1/2/4/8 as devices allow
    python benchmarks/ladder_decode.py --preset 70b --layers 16 --tp 2 --allreduce --json out.json
    python benchmarks/ladder_decode.py --preset toy --prompt 16 --new 4 --batches 1 --tp 1,2   # CPU smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.models import DecoderLM, ModelConfig, ladder
from jaxlm.models.config import RESIDUAL_MODES
from jaxlm.parallel.sharding import state_shardings

PRESETS = {
    "toy": ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128,
                       max_seq_len=256),
    # Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B shapes (untied head); --layers cuts the depth.
    "1b": ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
                      max_seq_len=2048, compute_dtype="bfloat16"),
    "8b": ModelConfig(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336,
                      max_seq_len=2048, compute_dtype="bfloat16"),
    "70b": ModelConfig(vocab_size=128256, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, mlp_dim=28672,
                       max_seq_len=2048, compute_dtype="bfloat16"),
}


def make_mesh(tensor: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:tensor]).reshape(1, 1, tensor), ("data", "fsdp", "tensor"))


def random_model_state(config: ModelConfig, mesh) -> nnx.State:
    """Timing-only random weights, ``N(0, 0.02²)`` per leaf, created directly in their mesh sharding in the
    compute dtype (the model's own initialisers compile slowly at 70B-shaped layers).

    The residual mode adds no parameters, so one state serves every mode's graphdef."""
    abstract_state = nnx.state(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    shardings = state_shardings(abstract_state, mesh)
    leaves, treedef = jax.tree.flatten(abstract_state)
    dtype = jnp.dtype(config.compute_dtype)

    def init():
        keys = jax.random.split(jax.random.key(0), len(leaves))
        values = [0.02 * jax.random.normal(key, leaf.shape, dtype) for key, leaf in zip(keys, leaves)]
        return jax.tree.unflatten(treedef, values)

    return jax.jit(init, out_shardings=shardings)()


def model_graphdef(config: ModelConfig) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))


def make_generation_fns(graphdef: nnx.GraphDef, new_tokens: int, cache_length: int, extra_options: dict):
    """Jitted ``prefill(state, tokens) -> (next_token, cache)`` and ``decode(state, token, cache, start)``
    (greedy, ``new_tokens - 1`` steps in a ``fori_loop``)."""

    def prefill(state, tokens):
        model = nnx.merge(graphdef, state)
        batch, length = tokens.shape
        cache = model.init_cache(batch, cache_length)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)  # [B, P]
        # DecoderLM.decode's steps, with the LM head on the last position only ([B, P, V] float32 logits
        # of a long prompt batch would not fit in memory).
        hidden, cache = ladder.apply_layers(model.layers, model.config, model.embed(tokens), positions, None, cache)
        last = model.final_norm(hidden[:, -1:])  # [B, 1, d_model]
        logits = model.embed.attend(last) if model.config.tie_embeddings else model.lm_head(last)  # [B, 1, V]
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    def decode(state, token, cache, start):
        weights, treedef = jax.tree.flatten(state)

        def step(index, carry):
            token, cache = carry
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
            positions = jnp.full((token.shape[0], 1), start + index, jnp.int32)  # [B, 1]
            logits, cache = model.decode(token[:, None], positions=positions, cache=cache)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, new_tokens - 1, step, (token, cache))

    decode_options = dict(ladder.decode_compiler_options(), **extra_options) or None
    return jax.jit(prefill), jax.jit(decode, donate_argnums=2, compiler_options=decode_options)


def compile_points(configs: dict, mesh, state, prompt: int, new: int, threads: int, extra_options: dict) -> dict:
    """Ahead-of-time compiled ``(prefill, decode)`` per point ``(batch, mode) -> config``.

    Tracing and lowering run in this thread (nnx and the mesh context are global state); only XLA's
    compilations, which release the GIL, run in ``threads`` worker threads: all prefills first, then the
    decodes, which need the prefill's output shardings."""
    functions = {}
    for point, config in configs.items():
        graphdef = model_graphdef(config)  # outside set_mesh: params carry logical names
        functions[point] = make_generation_fns(graphdef, new, prompt + new, extra_options)
    with jax.set_mesh(mesh), concurrent.futures.ThreadPoolExecutor(threads) as pool:
        tokens = {point: jax.ShapeDtypeStruct((point[0], prompt), jnp.int32,
                                              sharding=NamedSharding(mesh, PartitionSpec())) for point in configs}
        lowered = {point: functions[point][0].lower(state, tokens[point]) for point in configs}
        prefills = dict(zip(configs, pool.map(lambda low: low.compile(), lowered.values())))
        lowered = {}
        for point in configs:
            shapes = jax.eval_shape(functions[point][0], state, tokens[point])
            outputs = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                   shapes, prefills[point].output_shardings)
            lowered[point] = functions[point][1].lower(state, outputs[0], outputs[1], prompt)
        decodes = dict(zip(configs, pool.map(lambda low: low.compile(), lowered.values())))
    return {point: (prefills[point], decodes[point]) for point in configs}


def measure(prefill, decode, mesh, vocab_size: int, batch: int, prompt: int, state, repeats: int) -> dict:
    """Median prefill and decode seconds of one compiled point (one warm-up run first)."""
    tokens = jax.device_put(jnp.asarray(np.random.default_rng(0).integers(0, vocab_size, (batch, prompt)), jnp.int32),
                            NamedSharding(mesh, PartitionSpec()))
    prefill_times, decode_times = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        token, cache = jax.block_until_ready(prefill(state, tokens))
        middle = time.perf_counter()
        jax.block_until_ready(decode(state, token, cache, prompt))
        prefill_times.append(middle - start)
        decode_times.append(time.perf_counter() - middle)
    return {"prefill_s": statistics.median(prefill_times[1:]), "decode_s": statistics.median(decode_times[1:])}


def allreduce_seconds(mesh, batch: int, d_model: int, repeats: int = 200) -> float:
    """Time of one all-reduce over the tensor axis of a ``[batch, 1, d_model]`` bfloat16 partial sum.

    ``repeats`` dependent all-reduces run in one jitted loop (each adds the previous sum), so launch
    overhead is amortised the way it is in the decode loop."""
    def chain(x):  # x: [tensor, batch, 1, d_model], one partial sum per device
        def body(_, acc):
            return jax.lax.psum(acc, "tensor") * jnp.bfloat16(0.5)
        return jax.lax.fori_loop(0, repeats, body, x)

    tensor = mesh.shape["tensor"]
    spec = PartitionSpec("tensor")
    run = jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    x = jax.device_put(jnp.ones((tensor, batch, 1, d_model), jnp.bfloat16), NamedSharding(mesh, spec))
    jax.block_until_ready(run(x))
    start = time.perf_counter()
    jax.block_until_ready(run(x))
    return (time.perf_counter() - start) / repeats


def sweep(base: ModelConfig, tensor: int, args, rows: list[dict]) -> None:
    """Compile every (batch, mode) point of one TP in parallel threads, then measure them one by one,
    appending to ``rows``."""
    mesh = make_mesh(tensor)
    state = random_model_state(base, mesh)
    points = [(batch, mode) for batch in args.batches for mode in args.modes]
    started = time.perf_counter()
    configs = {point: dataclasses.replace(base, residual_mode=point[1]) for point in points}
    compiled = compile_points(configs, mesh, state, args.prompt, args.new, args.compile_threads, args.options)
    print(f"# TP {tensor}: compiled {len(points)} points in {time.perf_counter() - started:.0f} s", flush=True)
    for batch in args.batches:
        standard_rate = None
        allreduce = allreduce_seconds(mesh, batch, base.d_model) if args.allreduce and tensor > 1 else None
        for mode in args.modes:
            times = measure(*compiled[(batch, mode)], mesh, base.vocab_size, batch, args.prompt, state, args.repeats)
            rate = batch * (args.new - 1) / times["decode_s"]  # the prefill produced the first new token
            end_to_end = batch * args.new / (times["prefill_s"] + times["decode_s"])
            standard_rate = rate if mode == "standard" else standard_rate
            ratio = f"{rate / standard_rate:.2f}x" if standard_rate else "-"
            row = dict(times, tensor=tensor, batch=batch, mode=mode, layers=base.num_layers,
                       decode_tokens_per_s=rate, end_to_end_tokens_per_s=end_to_end)
            if allreduce is not None:
                row["allreduce_s"] = allreduce
            rows.append(row)
            if args.json:
                write_json(args.json, args, rows)
            print(f"{tensor:>3} {batch:>5} {mode:<12} {times['prefill_s'] * 1e3:>10.1f} "
                  f"{times['decode_s'] * 1e3:>10.1f} {rate:>12.1f} {end_to_end:>10.1f} {ratio:>7}"
                  + (f" {allreduce * 1e6:>8.1f}" if allreduce is not None else ""), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--tp", default="1,2,4,8")
    parser.add_argument("--modes", default=",".join(RESIDUAL_MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-threads", type=int, default=8)
    parser.add_argument("--allreduce", action="store_true", help="also time one all-reduce per TP and batch")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra XLA compiler option for the decode function (repeatable)")
    parser.add_argument("--json", default=None, help="write the rows (and the run's settings) to this file, "
                                                     "rewritten after every point")
    args = parser.parse_args(argv)
    try:
        args.options = ladder.parse_compiler_options(args.option)
    except ValueError as error:
        parser.error(str(error))
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = args.modes.split(",")
    unknown = sorted(set(args.modes) - set(RESIDUAL_MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; allowed: {', '.join(RESIDUAL_MODES)}")
    if args.new < 2 or args.prompt < 1 or min(args.batches) < 1 or (args.layers is not None and args.layers < 1):
        parser.error("--new must be ≥ 2, and --prompt, --batches and --layers ≥ 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    base = dataclasses.replace(preset, max_seq_len=max(preset.max_seq_len, args.prompt + args.new), tp_shard_map=True,
                               num_layers=args.layers or preset.num_layers)
    tensor_sizes = [t for t in map(int, args.tp.split(",")) if t <= jax.device_count()]
    print(f"# {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, preset {args.preset}, "
          f"{base.num_layers} layers, prompt {args.prompt}, new {args.new}, skipped TP > {jax.device_count()}")
    print(f"{'TP':>3} {'batch':>5} {'mode':<12} {'prefill ms':>10} {'decode ms':>10} {'decode tok/s':>12} "
          f"{'e2e tok/s':>10} {'vs std':>7}" + (f" {'AR us':>8}" if args.allreduce else ""))
    rows = []
    for tensor in tensor_sizes:
        sweep(base, tensor, args, rows)
    return rows


def write_json(path: str, args: argparse.Namespace, rows: list[dict]) -> None:
    """The run's device, settings and rows so far (rewritten after every point: a timeout loses nothing)."""
    settings = {key: value for key, value in vars(args).items() if key not in ("json", "option")}
    with open(path, "w") as file:
        json.dump({"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax": jax.__version__,
                   "settings": settings, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
