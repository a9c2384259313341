"""Decode throughput of the four residual modes under tensor parallelism (Ladder-residual paper protocol).

For every tensor-parallel size TP (devices of this host, mesh ``(1, 1, TP)``), batch size and residual
mode: prefill a random prompt of ``--prompt`` tokens, then greedily decode ``--new`` tokens with the KV
cache in one jitted ``lax.fori_loop``. Weights are random (bfloat16); times are the median of
``--repeats`` runs after a warm-up. The decode function is compiled with
``jaxlm.models.ladder.decode_compiler_options()`` (the all-reduce combiner off on GPU).

Columns: prefill ms, decode ms, decode tokens/s = ``B * new / decode time``, end-to-end tokens/s =
``B * new / (prefill + decode time)``, and the speed-up of decode tokens/s over ``standard``.

    python benchmarks/ladder_decode.py                         # 1B-shaped model, TP 1/2/4/8 as devices allow
    python benchmarks/ladder_decode.py --preset 8b --tp 1 --batches 1,4,16,64
    python benchmarks/ladder_decode.py --preset toy --prompt 16 --new 4 --batches 1 --tp 1,2   # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxlm.models import DecoderLM, ModelConfig, ladder
from jaxlm.models.config import RESIDUAL_MODES
from jaxlm.parallel.sharding import state_shardings

PRESETS = {
    "toy": ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128,
                       max_seq_len=256),
    # Llama-3.2-1B and Llama-3.1-8B shapes (untied head).
    "1b": ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
                      max_seq_len=2048, compute_dtype="bfloat16"),
    "8b": ModelConfig(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336,
                      max_seq_len=2048, compute_dtype="bfloat16"),
}


def make_mesh(tensor: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:tensor]).reshape(1, 1, tensor), ("data", "fsdp", "tensor"))


def random_model_state(config: ModelConfig, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights created directly in their mesh sharding, stored in the compute dtype."""
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)
    dtype = jnp.dtype(config.compute_dtype)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        state = nnx.state(DecoderLM(config, rngs=nnx.Rngs(0)))
        return jax.tree.map(lambda a: a.astype(dtype), state)

    return graphdef, init()


def make_generation_fns(graphdef: nnx.GraphDef, new_tokens: int, cache_length: int):
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

    decode_options = ladder.decode_compiler_options() or None
    return jax.jit(prefill), jax.jit(decode, donate_argnums=2, compiler_options=decode_options)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (which blocks on its result) over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config: ModelConfig, tensor: int, batch: int, prompt: int, new: int, repeats: int) -> dict:
    """Prefill and decode times (seconds) of one (mode, TP, batch) point."""
    mesh = make_mesh(tensor)
    graphdef, state = random_model_state(config, mesh)  # outside set_mesh: params carry logical names
    with jax.set_mesh(mesh):
        prefill, decode = make_generation_fns(graphdef, new, prompt + new)
        tokens = jax.device_put(jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt)),
                                            jnp.int32), NamedSharding(mesh, jax.sharding.PartitionSpec()))
        token, cache = jax.block_until_ready(prefill(state, tokens))  # compile + warm up
        jax.block_until_ready(decode(state, token, cache, prompt))
        prefill_s = median_seconds(lambda: jax.block_until_ready(prefill(state, tokens)), repeats)

        def decode_once():
            token, cache = prefill(state, tokens)
            jax.block_until_ready(cache)
            start = time.perf_counter()
            jax.block_until_ready(decode(state, token, cache, prompt))
            return time.perf_counter() - start

        decode_s = statistics.median(decode_once() for _ in range(repeats))
    return {"prefill_s": prefill_s, "decode_s": decode_s}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--tp", default="1,2,4,8")
    parser.add_argument("--modes", default=",".join(RESIDUAL_MODES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    base = dataclasses.replace(PRESETS[args.preset], max_seq_len=max(PRESETS[args.preset].max_seq_len,
                                                                     args.prompt + args.new), tp_shard_map=True)
    tensor_sizes = [t for t in map(int, args.tp.split(",")) if t <= jax.device_count()]
    print(f"# {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, preset {args.preset}, "
          f"prompt {args.prompt}, new {args.new}, skipped TP > {jax.device_count()}")
    print(f"{'TP':>3} {'batch':>5} {'mode':<12} {'prefill ms':>10} {'decode ms':>10} {'decode tok/s':>12} "
          f"{'e2e tok/s':>10} {'vs std':>7}")
    rows = []
    for tensor in tensor_sizes:
        for batch in map(int, args.batches.split(",")):
            standard_rate = None
            for mode in args.modes.split(","):
                times = measure(dataclasses.replace(base, residual_mode=mode), tensor, batch, args.prompt, args.new,
                                args.repeats)
                generated = batch * (args.new - 1)  # the prefill produced the first new token
                rate = generated / times["decode_s"]
                end_to_end = batch * args.new / (times["prefill_s"] + times["decode_s"])
                standard_rate = rate if mode == "standard" else standard_rate
                ratio = f"{rate / standard_rate:.2f}x" if standard_rate else "-"
                rows.append(dict(times, tensor=tensor, batch=batch, mode=mode, decode_tokens_per_s=rate,
                                 end_to_end_tokens_per_s=end_to_end))
                print(f"{tensor:>3} {batch:>5} {mode:<12} {times['prefill_s'] * 1e3:>10.1f} "
                      f"{times['decode_s'] * 1e3:>10.1f} {rate:>12.1f} {end_to_end:>10.1f} {ratio:>7}", flush=True)
    return rows


if __name__ == "__main__":
    main()
