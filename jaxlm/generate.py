"""Text generation: a right-padded prefill, then a jit-compiled ``lax.while_loop`` of one-token decode steps.

The loop only talks to the model through ``model.init_cache`` and ``model.decode``, so it works for any
mixer's cache (attention keys/values or recurrent states). The model is passed through ``nnx.split`` /
``nnx.merge`` with its graph definition static, so the whole generation (prefill + loop) is compiled once
per (batch size, padded prompt length, cache length, max_new_tokens, sampling) and reused.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError, require
from jaxlm.models.ladder import GPU_DECODE_COMPILER_OPTIONS
from jaxlm.sampling import SamplingConfig, sample_tokens

__all__ = ["SamplingConfig", "sample_tokens", "generate", "load_model_from_checkpoint",
           "generate_text_from_checkpoint", "LENGTH_BUCKET"]

# Padded prompt and cache lengths are rounded up to a multiple of this, to limit recompilation.
LENGTH_BUCKET = 16


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (), seed: int = 0,
             pad_id: int = 0, vocab_limit: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; return the new tokens of each prompt.

    A row ends at (and includes) its first token in ``stop_tokens``; the others keep going. Prompts may
    have different lengths: they are right-padded with ``pad_id`` and each row decodes from its own next
    position. ``vocab_limit`` (default: the model's vocabulary) keeps token ids ``>= vocab_limit`` from
    ever being drawn, for a model whose vocabulary is padded beyond its tokenizer's. Raises ConfigError
    for empty prompts, tokens outside the vocabulary, or a prompt that cannot fit ``max_new_tokens``
    more tokens within ``model.config.max_seq_len``.
    """
    sampling.validate()
    config = model.config
    _check_request(prompts, max_new_tokens, config.vocab_size, config.max_seq_len, stop_tokens, pad_id)
    vocab_limit = config.vocab_size if vocab_limit is None else vocab_limit
    require(isinstance(vocab_limit, int) and 0 < vocab_limit <= config.vocab_size, "vocab_limit", vocab_limit,
            f"an integer in [1, model.vocab_size={config.vocab_size}]")
    lengths = np.array([len(prompt) for prompt in prompts], np.int32)  # [B]
    prompt_length = _round_up(int(lengths.max()), LENGTH_BUCKET, cap=config.max_seq_len)
    cache_length = _round_up(int(lengths.max()) + max_new_tokens, LENGTH_BUCKET, cap=config.max_seq_len)
    tokens = np.full((len(prompts), prompt_length), pad_id, np.int32)  # [B, P]
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    graphdef, state = nnx.split(model)
    new_tokens = _generate_function(config)(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
        _padded_stop_tokens(stop_tokens), sampling=sampling, max_new_tokens=max_new_tokens,
        cache_length=cache_length, pad_id=pad_id, vocab_limit=vocab_limit)
    return [_cut_at_stop(row, stop_tokens) for row in np.asarray(new_tokens).tolist()]


def greedy_without_cache(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                         width: int = 32) -> list[list[int]]:
    """The slow reference for :func:`generate`: no cache, the whole sequence again for every new token.

    Each step runs ``model`` on every sequence right-padded to ``width`` (the model is causal, so padding after
    a sequence cannot change its logits; one width compiles the forward once) and appends the argmax at the
    sequence's last token. A new mixer's decode cache is correct when greedy ``generate`` equals this.
    """
    forward = nnx.jit(lambda model, tokens: model(tokens))
    sequences = [list(prompt) for prompt in prompts]
    for _ in range(max_new_tokens):
        tokens = np.zeros((len(sequences), width), np.int32)  # [B, width]
        for row, sequence in enumerate(sequences):
            tokens[row, : len(sequence)] = sequence
        logits = np.asarray(forward(model, jnp.asarray(tokens)))  # [B, width, V]
        for row, sequence in enumerate(sequences):
            sequence.append(int(logits[row, len(sequence) - 1].argmax()))
    return [sequence[len(prompt):] for sequence, prompt in zip(sequences, prompts)]


def _check_request(prompts, max_new_tokens, vocab_size, max_seq_len, stop_tokens, pad_id) -> None:
    """Raise ConfigError naming the first problem with a generation request."""
    require(len(prompts) > 0, "prompts", prompts, "a non-empty list of token lists")
    require(isinstance(max_new_tokens, int) and max_new_tokens > 0, "max_new_tokens", max_new_tokens,
            "a positive integer")
    for index, prompt in enumerate(prompts):
        require(len(prompt) > 0, f"prompts[{index}]", list(prompt), "a non-empty list of token ids")
        require(all(0 <= int(t) < vocab_size for t in prompt), f"prompts[{index}]", list(prompt),
                f"token ids in [0, {vocab_size})")
        require(len(prompt) + max_new_tokens <= max_seq_len, f"prompts[{index}]", f"length {len(prompt)}",
                f"a prompt length + max_new_tokens={max_new_tokens} of at most model.max_seq_len={max_seq_len}")
    for token in stop_tokens:
        require(0 <= int(token) < vocab_size, "stop_tokens", tuple(stop_tokens), f"token ids in [0, {vocab_size})")
    require(0 <= pad_id < vocab_size, "pad_id", pad_id, f"a token id in [0, {vocab_size})")


def _round_up(length: int, multiple: int, *, cap: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``, but never above ``cap`` (and never below length)."""
    return max(length, min(-(-length // multiple) * multiple, cap))


def _padded_stop_tokens(stop_tokens: Sequence[int]) -> jax.Array:
    """The stop tokens as int32 ``[S]``, S a multiple of 8 (filled with -1, which no token equals), so a
    different number of stop tokens rarely means a new compilation."""
    size = max(8, -(-len(stop_tokens) // 8) * 8)
    padded = np.full((size,), -1, np.int32)
    padded[: len(stop_tokens)] = list(stop_tokens)
    return jnp.asarray(padded)


def _cut_at_stop(tokens: list[int], stop_tokens: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first stop token (all of them if none occurs)."""
    stops = set(int(t) for t in stop_tokens)
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[: index + 1]
    return tokens


def _generate_body(graphdef, state, tokens, lengths, rng, stop_tokens, *, sampling, max_new_tokens, cache_length,
                  pad_id, vocab_limit):
    """Prefill ``tokens [B, P]`` and decode; returns the new tokens ``[B, max_new_tokens]`` (pad after a stop).

    Token ``n`` of row ``b`` sits at position ``lengths[b] + n``; the loop decodes the previous token and
    samples the next one until ``max_new_tokens`` are out or every row has produced a stop token.
    """
    batch_size = tokens.shape[0]
    last_logits, cache = _prefill(nnx.merge(graphdef, state), tokens, lengths, cache_length)  # [B, V]
    rng, first_rng = jax.random.split(rng)
    first = sample_tokens(_limit_vocab(last_logits, vocab_limit), first_rng, sampling)  # [B]
    output = jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)  # [B, N]
    done = jnp.isin(first, stop_tokens)  # [B]

    def keep_going(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    # The weights are closed over as plain arrays (loop invariants, never copied) and wrapped in fresh NNX
    # variables inside the loop body, so that NNX sees them at the loop's own trace level.
    weights, weights_treedef = jax.tree.flatten(state)

    def decode_one(carry):
        step, previous, output, done, cache, rng = carry
        model = nnx.merge(graphdef, jax.tree.unflatten(weights_treedef, weights))
        positions = (lengths + step - 1)[:, None]  # [B, 1]: where the previous token sits
        logits, cache = model.decode(previous[:, None], positions=positions, cache=cache)
        rng, step_rng = jax.random.split(rng)
        token = sample_tokens(_limit_vocab(logits[:, -1], vocab_limit), step_rng, sampling)  # [B]
        token = jnp.where(done, pad_id, token)
        output = output.at[:, step].set(token)
        done = done | jnp.isin(token, stop_tokens)
        return step + 1, token, output, done, cache, rng

    carry = (jnp.int32(1), first, output, done, cache, rng)
    output = jax.lax.while_loop(keep_going, decode_one, carry)[2]
    return output


_STATIC_ARGUMENTS = ("graphdef", "sampling", "max_new_tokens", "cache_length", "pad_id", "vocab_limit")
_generate_jit = jax.jit(_generate_body, static_argnames=_STATIC_ARGUMENTS)
# Tensor-parallel models on GPU: keep XLA from merging a layer's independent all-reduces (see
# jaxlm.models.ladder.GPU_DECODE_COMPILER_OPTIONS), which would serialise the ladder's overlap.
_generate_jit_tensor_parallel_gpu = jax.jit(_generate_body, static_argnames=_STATIC_ARGUMENTS,
                                            compiler_options=GPU_DECODE_COMPILER_OPTIONS)


def _generate_function(config):
    """The jitted generation loop for a model: with the decode compiler options for TP blocks on GPU."""
    on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    return _generate_jit_tensor_parallel_gpu if on_gpu and config.uses_tp_blocks else _generate_jit


def _prefill(model, tokens: jax.Array, lengths: jax.Array, cache_length: int):
    """Run the right-padded prompts ``tokens [B, P]`` through ``model.decode`` at positions ``0..P-1``.

    Returns the logits at each row's last real token ``[B, V]`` and the filled cache (slots past a row's
    length hold padding that the following decode steps overwrite or never attend to).
    """
    cache = model.init_cache(tokens.shape[0], cache_length)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # [B, P]
    is_prompt = (positions < lengths[:, None]).astype(jnp.int32)  # [B, P]: 1 on prompt tokens, 0 on padding
    logits, cache = model.decode(tokens, positions=positions, cache=cache, segment_ids=is_prompt)  # [B, P, V]
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache


def _limit_vocab(logits: jax.Array, vocab_limit: int) -> jax.Array:
    """``logits [B, V]`` with every id ``>= vocab_limit`` set to -inf (never sampled)."""
    if vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def load_model_from_checkpoint(directory: str, step: int | None = None):
    """Rebuild the model a training run saved and load its weights; returns ``(model, run_config)``.

    Reads the run config stored in the checkpoint metadata, builds the ``DecoderLM`` and the abstract
    train state the trainer saved (same optimizer, on a one-device mesh), restores that state and puts
    its parameters into the model. ``directory`` is the checkpoint directory (or a run's output
    directory holding ``checkpoints/``); ``step=None`` takes the latest complete checkpoint.
    """
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import run_config_from_dict
    from jaxlm.models.decoder import DecoderLM

    with Checkpointer(_checkpoint_directory(directory), async_save=False) as checkpointer:
        step = checkpointer.latest_step() if step is None else step
        run_config = run_config_from_dict(checkpointer.read_metadata(step)["config"])
        model = DecoderLM(run_config.model, rngs=nnx.Rngs(run_config.train.seed))
        restored, _, _ = checkpointer.restore(step, abstract_train_state=_abstract_train_state(model, run_config))
    nnx.update(model, restored.params)
    return model, run_config


def _checkpoint_directory(directory: str) -> str:
    """``directory``, or its ``checkpoints/`` folder when given a run's output directory."""
    import os

    nested = os.path.join(directory, "checkpoints")
    has_steps = os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
    return nested if not has_steps and os.path.isdir(nested) else directory


def _abstract_train_state(model, run_config):
    """Shapes, dtypes and one-device shardings of the ``TrainState`` the trainer saves for ``model``."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.config import MeshConfig
    from jaxlm.train.optim import make_optimizer
    from jaxlm.train.step import TrainState

    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(run_config.optimizer, params, run_config.train.steps)
    state = jax.eval_shape(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p)), params)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)


def generate_text_from_checkpoint(directory: str, prompts: Sequence[str], *, max_new_tokens: int,
                                  sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                                  step: int | None = None) -> list[str]:
    """Load a checkpoint, encode ``prompts`` with the run's tokenizer, generate, and decode prompt + completion.

    Generation of a row stops at the tokenizer's end-of-sequence token (which is not part of the text).
    This is what ``jaxlm generate --checkpoint DIR --prompt ...`` runs.
    """
    from jaxlm.data.tokenizers import tokenizer_for

    if not prompts:
        raise ConfigError("--prompt", list(prompts), "at least one prompt")
    model, run_config = load_model_from_checkpoint(directory, step)
    tokenizer = tokenizer_for(run_config.data)
    encoded = [_encode_prompt(tokenizer, prompt) for prompt in prompts]
    new_tokens = generate(model, encoded, max_new_tokens=max_new_tokens, sampling=sampling,
                          stop_tokens=(tokenizer.eos_id,), seed=seed, pad_id=tokenizer.pad_id,
                          vocab_limit=min(tokenizer.vocab_size, run_config.model.vocab_size))
    return [tokenizer.decode(prompt + [t for t in tokens if t != tokenizer.eos_id])
            for prompt, tokens in zip(encoded, new_tokens)]


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    try:
        return list(tokenizer.encode(prompt))
    except (ValueError, KeyError) as error:
        raise ConfigError("--prompt", prompt, f"text the run's tokenizer can encode ({error})") from None
