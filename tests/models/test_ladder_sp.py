"""Sequence-parallel tensor-parallel blocks (``model.tp_sequence_parallel``) on 8 fake CPU devices.

Logits equal one device in the communicating residual modes (standard, parallel, ladder), the layer
stack's output equals the all-reduce layout's and its gradients one device's, scan equals unrolled, cached
decoding keeps the all-reduce layout, the compiled layer stack communicates by all-gather / reduce-scatter
only (no all-reduce of activations), the upper bound has the same matmuls and no collectives, and
unsupported settings raise ConfigError naming the field. The one-device forward these compare with is
itself checked against the written-out recurrences in test_ladder.py.
"""

import collections
import dataclasses
import functools
import importlib.util
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.convert import to_unrolled
from jaxlm.errors import ConfigError
from jaxlm.models import DecoderLM, ModelConfig, ladder
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.config import MeshConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("ladder_hlo", REPO / "benchmarks" / "ladder_hlo.py")
ladder_hlo = sys.modules.setdefault("ladder_hlo", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(ladder_hlo)

CONFIG = ModelConfig(vocab_size=61, d_model=24, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=20,
                     init_std=0.2, rope_theta=300.0, max_seq_len=32, tp_shard_map=True)
TENSOR, DATA = 4, 2
BATCH, LENGTH = 2, 12  # a sequence chunk of 3 tokens per tensor device

COLLECTIVES = ("all-reduce", "all-reduce-start", "all-gather", "all-gather-start", "reduce-scatter",
               "collective-permute", "all-to-all")
_RESULT_TYPE = re.compile(r"=\s*(.*?)\s+([\w\-]+)\(")
_ARRAY_DIMS = re.compile(r"\w+\[([\d,]*)\]")


def make_model(seed=0, **changes):
    return DecoderLM(dataclasses.replace(CONFIG, **changes), rngs=nnx.Rngs(seed))


def random_tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=shape), jnp.int32)


def tp_mesh():
    return make_mesh(MeshConfig(data=DATA, fsdp=1, tensor=TENSOR), devices=jax.devices()[: DATA * TENSOR])


@nnx.jit
def forward(model, tokens):
    return model(tokens)


# ladder from layer 1 runs standard layers too; the decode test reuses its one-device forward.
@pytest.mark.parametrize("mode,start", [("parallel", 0), ("ladder", 1)])
def test_sequence_parallel_logits_equal_one_device(mode, start):
    """Without a mesh the flag changes nothing (test_ladder.py checks that forward against the written-out
    recurrences, and the all-reduce layout against it)."""
    model = make_model(seed=1, residual_mode=mode, ladder_start_layer=start, tp_sequence_parallel=True)
    tokens = random_tokens(1, (BATCH, LENGTH))
    one_device = forward(model, tokens)  # [B, T, V]
    with jax.set_mesh(tp_mesh()):
        sequence_parallel = forward(model, tokens)
    assert float(jnp.abs(one_device).max()) > 0.1  # logits far from zero, so the tolerance means something
    np.testing.assert_allclose(sequence_parallel, one_device, rtol=1e-5, atol=1e-5)


def test_sequence_parallel_ladder_scan_equals_unrolled():
    """(The scanned stack equals one device in test_sequence_parallel_gradients_equal_one_device.)"""
    scanned = make_model(seed=2, residual_mode="ladder", scan_layers=True, tp_sequence_parallel=True)
    unrolled = to_unrolled(scanned)
    tokens = random_tokens(2, (BATCH, LENGTH))
    with jax.set_mesh(tp_mesh()):
        scanned_logits, unrolled_logits = forward(scanned, tokens), forward(unrolled, tokens)
    assert float(jnp.abs(scanned_logits).max()) > 0.1
    np.testing.assert_allclose(scanned_logits, unrolled_logits, rtol=1e-5, atol=1e-5)


@nnx.jit
def decode(model, tokens, positions, cache):
    return model.decode(tokens, positions=positions, cache=cache)


def test_cached_decode_keeps_all_reduce_layout():
    """A 5-token prefill and 1-token steps (neither a multiple of the tensor size) equal the full forward."""
    model = make_model(seed=1, residual_mode="ladder", ladder_start_layer=1, tp_sequence_parallel=True)
    tokens = random_tokens(4, (BATCH, LENGTH))
    full = forward(model, tokens)  # [B, T, V], no mesh
    with jax.set_mesh(tp_mesh()):
        cache = model.init_cache(BATCH, 16)
        logits, cache = decode(model, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (BATCH, 5)), cache)
        steps = [logits]
        for t in range(5, LENGTH):
            logits, cache = decode(model, tokens[:, t:t + 1], jnp.full((BATCH, 1), t), cache)
            steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


def collectives_of(hlo_text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(opcode, result array shapes) of every collective in compiled HLO text, in every computation."""
    found = []
    for name, body in ladder_hlo.parse_computations(hlo_text).items():
        for instruction in body if name != "ENTRY" else ():
            match = _RESULT_TYPE.search(instruction.line)
            if instruction.opcode in COLLECTIVES and match:
                shapes = [tuple(int(d) for d in dims.split(",") if d)
                          for dims in _ARRAY_DIMS.findall(match.group(1))]
                found.append((instruction.opcode.removesuffix("-start"), shapes))
    return found


def dot_shapes(hlo_text: str) -> collections.Counter:
    """How many dots of each result type the compiled HLO has (the compute, layout-independent)."""
    counts = collections.Counter()
    for name, body in ladder_hlo.parse_computations(hlo_text).items():
        for instruction in body if name != "ENTRY" else ():
            if instruction.opcode == "dot":
                counts[_RESULT_TYPE.search(instruction.line).group(1).split("{")[0]] += 1
    return counts


@functools.cache
def compiled_stack(mode: str, sequence_parallel: bool, gradient: bool, on_mesh: bool = True):
    """(compiled HLO text or None, outputs) of the scanned, rematerialised layer stack alone on an input
    ``x``: ``blocks(x)``, or with ``gradient`` the loss ``sum(sin(blocks(x)))`` and its gradients with
    respect to the weights and ``x``; on the tensor-parallel mesh or on one device."""
    model = make_model(seed=5, residual_mode=mode, scan_layers=True, remat="full",
                       tp_sequence_parallel=sequence_parallel)
    x = jax.random.normal(jax.random.key(5), (DATA * BATCH, LENGTH, CONFIG.d_model))  # [B, T, d]
    graphdef, params = nnx.split(model.layers)

    def blocks(params, x):
        hidden, _ = ladder.apply_layers(nnx.merge(graphdef, params), model.config, x, None, None, None)
        return hidden  # [B, T, d]

    program = jax.jit(jax.value_and_grad(lambda *args: jnp.sum(jnp.sin(blocks(*args))), argnums=(0, 1))
                      if gradient else blocks)
    if not on_mesh:
        return None, program(params, x)
    with jax.set_mesh(tp_mesh()):
        compiled = program.lower(params, x).compile()
        return compiled.as_text(), compiled(params, x)


def is_activation(shape: tuple[int, ...]) -> bool:
    """A per-device ``[B, T or T/n, d_model]`` array (a weight or a norm scale has no sequence axis)."""
    return len(shape) == 3 and shape[1] in (LENGTH, LENGTH // TENSOR) and shape[2] == CONFIG.d_model


def activation_collectives(hlo_text: str) -> collections.Counter:
    """How many collectives of each opcode move activation-shaped arrays."""
    return collections.Counter(opcode for opcode, shapes in collectives_of(hlo_text)
                               if any(map(is_activation, shapes)))


def test_sequence_parallel_gradients_equal_one_device():
    _, (expected_loss, expected_grads) = compiled_stack("ladder", False, gradient=True, on_mesh=False)
    _, (loss, grads) = compiled_stack("ladder", True, gradient=True)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    got = jax.tree.leaves(nnx.to_pure_dict(grads[0])) + [grads[1]]
    want = jax.tree.leaves(nnx.to_pure_dict(expected_grads[0])) + [expected_grads[1]]
    assert len(got) == len(want) == 10  # 9 weight arrays (stacked over layers) and the input
    for grad, reference in zip(got, want):
        assert float(jnp.abs(reference).max()) > 1e-3  # every gradient is non-trivial
        np.testing.assert_allclose(grad, reference, rtol=1e-4, atol=1e-5)


def test_sequence_parallel_stack_output_equals_all_reduce_layout():
    _, sequence_parallel = compiled_stack("ladder", True, gradient=False)  # [B, T, d]
    _, all_reduce_layout = compiled_stack("ladder", False, gradient=False)
    assert float(jnp.abs(all_reduce_layout).max()) > 0.1
    np.testing.assert_allclose(sequence_parallel, all_reduce_layout, rtol=1e-5, atol=1e-5)


def test_compiled_sequence_parallel_step_gathers_and_scatters_without_activation_all_reduce():
    """Forward and backward of the stack: 2L = 4 modules, each gathering its input and scattering its
    output, in the scan body (the weight gradients' data-parallel all-reduces are not activations)."""
    sequence_parallel = activation_collectives(compiled_stack("ladder", True, gradient=True)[0])
    assert sequence_parallel["reduce-scatter"] >= 2 and sequence_parallel["all-gather"] >= 2
    assert sequence_parallel["all-reduce"] == 0
    # control: the all-reduce layout all-reduces activations and neither gathers nor scatters them.
    all_reduce_layout = activation_collectives(compiled_stack("ladder", False, gradient=False)[0])
    assert all_reduce_layout["all-reduce"] >= 2
    assert all_reduce_layout["reduce-scatter"] == all_reduce_layout["all-gather"] == 0


def test_sequence_parallel_upper_bound_has_the_ladder_matmuls_and_no_collectives():
    upper_bound = compiled_stack("upper_bound", True, gradient=False)[0]
    ladder_hlo_text = compiled_stack("ladder", True, gradient=False)[0]
    assert collectives_of(upper_bound) == []
    assert sum(activation_collectives(ladder_hlo_text).values()) >= 4  # the control communicates
    assert dot_shapes(upper_bound) == dot_shapes(ladder_hlo_text) and sum(dot_shapes(upper_bound).values()) > 0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="tp_sequence_parallel"):
        make_model(tp_shard_map=False, tp_sequence_parallel=True)  # standard blocks without the TP wiring
    with pytest.raises(ConfigError, match="tp_sequence_parallel"):
        make_model(tp_sequence_parallel=1)
    model = make_model(residual_mode="ladder", tp_sequence_parallel=True)
    with jax.set_mesh(tp_mesh()), pytest.raises(ConfigError, match="tp_sequence_parallel.*multiple of"):
        forward(model, random_tokens(0, (BATCH, LENGTH - 1)))
