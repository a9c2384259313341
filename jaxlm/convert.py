"""Import Hugging Face ``transformers`` Llama weights into a :class:`jaxlm.models.decoder.DecoderLM`.

The layouts match one to one (RoPE uses the same rotate-half convention), so the import is a renaming:
torch linear weights ``[out, in]`` become our kernels ``[in, out]``; the embedding and norm scales are
copied as they are. torch is only touched through the objects the caller passes in.

``to_ladder`` rewires the last k layers of an imported (or any standard) model as Ladder-residual layers
with the same weights (Zhang et al. 2025, section 5: convert the upper layers, then fine-tune briefly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError, require
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM

# Per-layer HF weight name (after "model.layers.{i}.") -> (our path inside one decoder block, transpose?).
LAYER_WEIGHTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "input_layernorm.weight": (("mixer_norm", "scale"), False),
    "self_attn.q_proj.weight": (("mixer", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("mixer", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("mixer", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("mixer", "o_proj", "kernel"), True),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
}
ATTENTION_BIASES: dict[str, tuple[tuple[str, ...], bool]] = {
    f"self_attn.{name}.bias": (("mixer", name, "bias"), False) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
}
# Buffers some checkpoints carry that hold no weights (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def llama_from_hf(hf_model_or_state_dict: Any, hf_config: Any = None, *, scan_layers: bool = False,
                  compute_dtype: str = "float32") -> DecoderLM:
    """A ``DecoderLM`` computing the same logits as a Hugging Face ``LlamaForCausalLM``.

    Pass the torch model, or its ``state_dict()`` together with its ``LlamaConfig``. Raises ConfigError
    for Llama variants we do not implement (RoPE scaling, MLP biases, other activations) and for a
    missing, unexpected or mis-shaped weight, naming it.
    """
    if hf_config is None:
        require(hasattr(hf_model_or_state_dict, "config") and hasattr(hf_model_or_state_dict, "state_dict"),
                "hf_config", None, "a LlamaConfig when a state dict (not a LlamaForCausalLM) is passed")
        hf_config = hf_model_or_state_dict.config
    state_dict = hf_model_or_state_dict
    if hasattr(state_dict, "state_dict"):
        state_dict = state_dict.state_dict()
    require(isinstance(state_dict, Mapping), "hf_model_or_state_dict", type(state_dict).__name__,
            "a transformers LlamaForCausalLM or its state_dict()")
    config = model_config_from_hf(hf_config, scan_layers=scan_layers, compute_dtype=compute_dtype)
    weights = {name: _to_numpy(tensor) for name, tensor in state_dict.items() if not name.endswith(IGNORED_SUFFIXES)}
    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    _load_weights(model, config, weights)
    return model


def model_config_from_hf(hf_config: Any, *, scan_layers: bool = False, compute_dtype: str = "float32") -> ModelConfig:
    """The ``ModelConfig`` of a ``transformers.LlamaConfig``; ConfigError for unsupported settings."""
    _check_supported(hf_config)
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        mlp_dim=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(_rope_parameters(hf_config).get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        mixer="attention",
        scan_layers=scan_layers,
        compute_dtype=compute_dtype,
    ).validate()


def _rope_parameters(hf_config: Any) -> dict:
    """RoPE settings: ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` (older), or {}."""
    return dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})


def _check_supported(hf_config: Any) -> None:
    """Raise ConfigError naming the first Llama setting this model does not implement."""
    model_type = getattr(hf_config, "model_type", "llama")
    require(model_type == "llama", "hf_config.model_type", model_type, "'llama'")
    rope_type = _rope_parameters(hf_config).get("rope_type", _rope_parameters(hf_config).get("type", "default"))
    require(rope_type == "default", "hf_config.rope_scaling", _rope_parameters(hf_config),
            "no RoPE scaling (rope_type 'default'); scaled RoPE variants (llama3, linear, dynamic, yarn, ...) "
            "are not implemented")
    require(not getattr(hf_config, "mlp_bias", False), "hf_config.mlp_bias", True, "False (the MLP has no biases)")
    activation = getattr(hf_config, "hidden_act", "silu")
    require(activation == "silu", "hf_config.hidden_act", activation, "'silu' (SwiGLU MLP)")


def hf_weight_paths(config: ModelConfig) -> dict[str, tuple[tuple[Any, ...], int | None, bool]]:
    """HF weight name -> (path of our parameter, index on the stacked layer axis or None, transpose?)."""
    per_layer = dict(LAYER_WEIGHTS, **(ATTENTION_BIASES if config.attention_bias else {}))
    period = len(config.mixer_pattern)
    paths: dict[str, tuple[tuple[Any, ...], int | None, bool]] = {
        "model.embed_tokens.weight": (("embed", "embedding"), None, False),
        "model.norm.weight": (("final_norm", "scale"), None, False),
    }
    if not config.tie_embeddings:
        paths["lm_head.weight"] = (("lm_head", "kernel"), None, True)
    for layer in range(config.num_layers):
        for hf_suffix, (block_path, transpose) in per_layer.items():
            name = f"model.layers.{layer}.{hf_suffix}"
            if config.scan_layers:
                paths[name] = (("layers", "groups", "blocks", layer % period, *block_path), layer // period, transpose)
            else:
                paths[name] = (("layers", "blocks", layer, *block_path), None, transpose)
    return paths


def _load_weights(model: DecoderLM, config: ModelConfig, weights: dict[str, np.ndarray]) -> None:
    """Copy every HF weight into ``model``; error on missing, unexpected or mis-shaped weights."""
    paths = hf_weight_paths(config)
    if config.tie_embeddings and "lm_head.weight" in weights:
        lm_head = weights.pop("lm_head.weight")
        require(np.array_equal(lm_head, weights.get("model.embed_tokens.weight")), "lm_head.weight", "untied values",
                "equal to model.embed_tokens.weight when tie_word_embeddings is True")
    missing = sorted(set(paths) - set(weights))
    require(not missing, "hf weights", missing[:5], "every weight of the Llama layout (these are missing)")
    unexpected = sorted(set(weights) - set(paths))
    require(not unexpected, "hf weights", unexpected[:5], "only weights of the supported Llama layout (unexpected)")

    collected: dict[tuple, list[tuple[int | None, str, np.ndarray]]] = {}
    for name, (path, stack_index, transpose) in paths.items():
        collected.setdefault(path, []).append((stack_index, name, weights[name].T if transpose else weights[name]))
    params = {path: variable for path, variable in nnx.iter_graph(model) if isinstance(variable, nnx.Param)}
    not_filled = sorted(set(params) - set(collected), key=str)
    if not_filled:
        raise ConfigError("hf weights", "none", f"a weight for every model parameter; nothing maps to {not_filled[0]}")
    for path, pieces in collected.items():
        names = [name for _, name, _ in pieces]
        value = np.stack([array for _, _, array in sorted(pieces, key=lambda p: p[0])]) if pieces[0][0] is not None \
            else pieces[0][2]
        variable = params[path]
        require(value.shape == variable.shape, names[0], f"shape {value.shape}",
                f"shape {variable.shape} for {'.'.join(map(str, path))} (after transposing torch [out, in] kernels)")
        variable.value = jnp.asarray(value, jnp.float32)


def _to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (any float dtype, any device) or array as float32 numpy."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor, np.float32)


def to_ladder(model: DecoderLM, num_ladder_layers: int) -> DecoderLM:
    """A copy of the standard ``model`` whose last ``num_ladder_layers`` layers use the Ladder residual.

    Layers ``0 .. L-k-1`` keep ``x = x + h(x)``; from layer ``L-k`` on, each module reads the stream without
    the previous module's output (``jaxlm.models.ladder``). No parameter changes: the result shares none
    of ``model``'s arrays (they are copied). Zero-shot, the converted model is a different function; the
    paper recovers the original quality with a short fine-tune. A scanned model converts only whole
    (``num_ladder_layers = L``), since a scan repeats one residual wiring.
    """
    config = model.config
    require(config.residual_mode == "standard", "model.residual_mode", config.residual_mode,
            "'standard' (to_ladder converts a standard model)")
    require(isinstance(num_ladder_layers, int) and 0 < num_ladder_layers <= config.num_layers, "num_ladder_layers",
            num_ladder_layers, f"an integer in [1, model.num_layers={config.num_layers}]")
    ladder_config = dataclasses.replace(config, residual_mode="ladder",
                                        ladder_start_layer=config.num_layers - num_ladder_layers).validate()
    converted = nnx.eval_shape(lambda: DecoderLM(ladder_config, rngs=nnx.Rngs(0)))
    state = jax.tree.map(jnp.array, nnx.state(model))  # fresh copies of every array
    nnx.update(converted, state)
    return converted


def to_unrolled(model: DecoderLM) -> DecoderLM:
    """The same function as the scanned ``model`` with its layer stack unrolled: layer ``i`` takes row ``i``
    of the stacked block parameters (``model.scan_layers`` with a one-mixer pattern); other parameters are
    copied as they are."""
    config = model.config
    require(config.scan_layers, "model.scan_layers", config.scan_layers, "True (the model to unroll is scanned)")
    require(len(config.mixer_pattern) == 1, "model.layer_pattern", config.layer_pattern,
            "a single mixer (one stacked block per layer)")
    unrolled = nnx.eval_shape(lambda: DecoderLM(dataclasses.replace(config, scan_layers=False), rngs=nnx.Rngs(0)))
    source = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    target = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    stacked = source.pop("layers")["groups"]["blocks"][0]
    target["layers"]["blocks"] = {index: jax.tree.map(lambda a, index=index: jnp.array(a[index]), stacked)
                                  for index in range(config.num_layers)}
    target.update(jax.tree.map(jnp.array, source))
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, target)
    nnx.update(unrolled, state)
    return unrolled
