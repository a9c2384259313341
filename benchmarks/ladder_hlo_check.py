"""Proof of communication overlap for the Ladder Transformer's tensor-parallel blocks, read from compiled HLO.

Two checks, each with negative controls that must fail the same test:

``--platform cpu`` (structural; runs on fake CPU devices, all-reduces there are synchronous): the longest
chain of data-dependent all-reduces through the unrolled layer stack is L for the ladder and 2L for the
standard model (the combiner pass is disabled so the ladder's two independent per-layer all-reduces stay
separate). With ``--sequence-parallel`` the forward rows count reduce-scatters instead (same chains, and no
all-reduce may remain); decode rows keep the all-reduce layout.

``--platform gpu`` (needs one GPU to describe the target; nothing runs): the blocks are compiled for an
8-GPU topology with compile-only devices. Target: every all-reduce but (at most) the last is an
``all-reduce-start`` with ``"is_sync":false`` and at least one matmul scheduled before its
``all-reduce-done``, at decode (1 new token on a 1024-token cache) and prefill (1024 tokens) shapes.
Controls: the standard model, and the ladder compiled with asynchronous all-reduces turned off.

Prints a table; exits 1 when the ladder fails or a control passes.

    python benchmarks/ladder_hlo_check.py --platform gpu
    python benchmarks/ladder_hlo_check.py --platform cpu --layers 3
    python benchmarks/ladder_hlo_check.py --platform cpu --sequence-parallel
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

CPU_FLAGS = "--xla_force_host_platform_device_count=8 --xla_disable_hlo_passes=cpu-all-reduce-combiner"
if __name__ == "__main__" and "--platform" in sys.argv and sys.argv[sys.argv.index("--platform") + 1] == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_FLAGS).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ladder_hlo  # noqa: E402

from jaxlm.models import DecoderLM, ModelConfig  # noqa: E402
from jaxlm.models import ladder  # noqa: E402
from jaxlm.parallel import tp  # noqa: E402

# Per-jit option that keeps XLA from making all-reduces asynchronous (the "no async" control).
SYNC_ALL_REDUCE_OPTIONS = ({"xla_gpu_disable_async_collectives": "ALLREDUCE"},
                           {"xla_gpu_enable_async_all_reduce": False})


def blocks_hlo(config: ModelConfig, mesh, batch: int, length: int, cache_length: int | None,
               compiler_options: dict) -> str:
    """Optimised HLO text of the decoder blocks alone (no embedding / LM head) compiled on ``mesh``.

    ``cache_length`` None: a training-style forward over ``length`` tokens; else a cached decode of
    ``length`` tokens at positions ``cache_length - length ..`` into a cache of ``cache_length`` slots.
    """
    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model.layers)
    param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), tp.param_specs(state, mesh),
                                   is_leaf=lambda x: isinstance(x, PartitionSpec))
    dtype = jnp.dtype(config.compute_dtype)
    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((batch, length, config.d_model), dtype, sharding=replicated)
    start = 0 if cache_length is None else cache_length - length
    positions = jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), (batch, length))
    cache = None
    if cache_length is not None:
        cache = nnx.eval_shape(lambda: model.layers.init_cache(batch, cache_length))
        batch_axes = tp.batch_axes(mesh, batch)
        cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
            mesh, tp.cache_spec(a.ndim, batch_axes, config.scan_layers))), cache)

    def run_blocks(state, x, cache):
        layers = nnx.merge(graphdef, state)
        return ladder.apply_layers(layers, config, x, positions, None, cache)

    abstract_state = jax.tree.map(
        lambda sharding, variable: variable.replace(jax.ShapeDtypeStruct(variable.shape, variable.dtype,
                                                                         sharding=sharding)),
        param_shardings, state, is_leaf=lambda x: isinstance(x, NamedSharding))
    with jax.set_mesh(mesh):
        lowered = jax.jit(run_blocks).lower(abstract_state, x, cache)
    return lowered.compile(compiler_options or None).as_text()


def tensor_mesh(devices, tensor: int):
    """A ``(data=1, fsdp=1, tensor)`` mesh of ``devices``."""
    return jax.sharding.Mesh(np.array(devices[:tensor]).reshape(1, 1, tensor), ("data", "fsdp", "tensor"))


def cpu_check(layers: int, sequence_parallel: bool = False) -> bool:
    """Longest all-reduce chain: ladder L, parallel L, standard 2L (unrolled; forward and decode step).

    ``sequence_parallel``: the forward rows count reduce-scatters (the same chains) and fail on any
    all-reduce; the decode rows (which keep the all-reduce layout) still count all-reduces.
    """
    mesh = tensor_mesh(jax.devices(), 4)
    config = ModelConfig(vocab_size=64, d_model=64, num_layers=layers, num_heads=4, num_kv_heads=4, mlp_dim=128,
                         max_seq_len=64, tp_shard_map=True, tp_sequence_parallel=sequence_parallel)
    expected = {"standard": 2 * layers, "parallel": layers, "ladder": layers}
    ok = True
    if sequence_parallel:
        print("sequence-parallel: forward rows count reduce-scatters, decode rows all-reduces")
    counted_name = "collectives" if sequence_parallel else "all-reduces"
    print(f"{'mode':<10} {'shape':<8} {counted_name:>11} {'longest chain':>13} {'expected':>8}")
    for mode, want in expected.items():
        for shape, (length, cache_length) in {"forward": (8, None), "decode": (1, 16)}.items():
            hlo = blocks_hlo(dataclasses.replace(config, residual_mode=mode), mesh, 2, length, cache_length, {})
            entry = ladder_hlo.parse_computations(hlo)["ENTRY"]
            counted = ladder_hlo.ALL_REDUCE_STARTS
            if sequence_parallel and cache_length is None:
                counted = ladder_hlo.REDUCE_SCATTER_STARTS
                ok &= ladder_hlo.count_all_reduces(entry) == 0
            chain = ladder_hlo.longest_collective_chain(entry, counted)
            count = ladder_hlo.count_collectives(entry, counted)
            ok &= chain == want
            print(f"{mode:<10} {shape:<8} {count:>11} {chain:>13} {want:>8}")
    return ok


def gpu_topology_devices(count: int):
    """Compile-only devices of a ``1x1xcount`` CUDA topology (the attached GPU describes the target)."""
    from jax.experimental import topologies

    try:
        from jax._src.lib import xla_client

        target_config = xla_client.get_topology_for_devices(jax.devices("gpu")).target_config
        return topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                            target_config=target_config).devices
    except (AttributeError, TypeError, ImportError):
        return topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}").devices


def gpu_check(layers: int, tensor: int, extra_options: dict, dump: str | None) -> bool:
    """Ladder passes the overlap check at decode and prefill shapes; standard and no-async controls fail.

    ``extra_options`` are added to every case's compiler options; ``dump`` (a folder) receives each case's
    optimised HLO text."""
    mesh = tensor_mesh(gpu_topology_devices(tensor), tensor)
    config = ModelConfig(vocab_size=32000, d_model=4096, num_layers=layers, num_heads=32, num_kv_heads=8,
                         mlp_dim=14336, max_seq_len=2048, compute_dtype="bfloat16", tp_shard_map=True)
    shapes = {"decode": (1, 1, 1024), "prefill": (1, 1024, 1024)}
    cases = [("ladder", "default", True), ("standard", "default", False), ("ladder", "no-async", False)]
    print(f"{'mode':<10} {'options':<9} {'shape':<8} {'all-reduces':>11} {'async':>6} {'overlapped':>10} "
          f"{'pass':>5} {'expected':>8}")
    ok = True
    for mode, options_name, should_pass in cases:
        for shape_name, (batch, length, cache_length) in shapes.items():
            model_config = dataclasses.replace(config, residual_mode=mode)
            summary, used = None, ""
            for options in _option_sets(options_name, extra_options):
                try:
                    hlo = blocks_hlo(model_config, mesh, batch, length, cache_length, options)
                except Exception as error:  # an option this XLA build does not know: try the next spelling
                    print(f"  (options {options} rejected: {str(error).splitlines()[0][:120]})")
                    continue
                summary, used = ladder_hlo.overlap_summary(hlo), options
                if dump:
                    os.makedirs(dump, exist_ok=True)
                    with open(os.path.join(dump, f"{mode}_{options_name}_{shape_name}.hlo.txt"), "w") as file:
                        file.write(hlo)
                break
            if summary is None:
                print(f"{mode:<10} {options_name:<9} {shape_name:<8} could not compile")
                ok = False
                continue
            passed = ladder_hlo.passes_overlap_check(summary)
            ok &= passed == should_pass
            print(f"{mode:<10} {options_name:<9} {shape_name:<8} {summary['all_reduces']:>11} {summary['async']:>6} "
                  f"{summary['async_overlapped']:>10} {str(passed):>5} {str(should_pass):>8}   {used}")
    return ok


def _option_sets(name: str, extra_options: dict):
    """The compiler-option dicts to try, in order: decode options (plus ``extra_options``), plus the
    no-async switch for the control."""
    base = dict(ladder.decode_compiler_options("gpu"), **extra_options)
    if name == "default":
        return [base]
    return [dict(base, **extra) for extra in SYNC_ALL_REDUCE_OPTIONS]


def compiler_options_or_exit(items: list[str], parser: argparse.ArgumentParser) -> dict:
    try:
        return ladder.parse_compiler_options(items)
    except ValueError as error:
        parser.error(str(error))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", choices=("cpu", "gpu"), required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tensor", type=int, default=8)
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="CPU check of the sequence-parallel layout (model.tp_sequence_parallel)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra XLA compiler option for every GPU case (repeatable), e.g. "
                             "xla_gpu_allow_all_reduce_kernel=false")
    parser.add_argument("--dump", default=None, help="folder for the optimised HLO text of every GPU case")
    args = parser.parse_args(argv)
    if (args.option or args.dump) and args.platform != "gpu":
        parser.error("--option and --dump apply to --platform gpu")
    if args.sequence_parallel and args.platform != "cpu":
        parser.error("--sequence-parallel is a check of the CPU structural test (--platform cpu)")
    if args.platform == "cpu":
        ok = cpu_check(args.layers, args.sequence_parallel)
    else:
        ok = gpu_check(args.layers, args.tensor, compiler_options_or_exit(args.option, parser), args.dump)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
