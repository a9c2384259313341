"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

All of it is jittable: the :class:`SamplingConfig` is a static (hashable) value, the logits and the
random key are traced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.errors import require


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How :func:`sample_tokens` picks a token.

    ``temperature``: 0 picks the most likely token (greedy); otherwise the logits are divided by it.
    ``top_k``: keep only the k most likely tokens (0 = off).
    ``top_p``: keep the smallest set of most likely tokens whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2020; 1.0 = off). Applied after top-k, on the renormalised
    top-k distribution (the order Hugging Face uses).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> "SamplingConfig":
        """Raise ConfigError naming the first bad field; return self when all are valid."""
        require(isinstance(self.temperature, (int, float)) and self.temperature >= 0, "sampling.temperature",
                self.temperature, "a number >= 0 (0 means greedy)")
        require(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
                "sampling.top_k", self.top_k, "an integer >= 0 (0 turns top-k off)")
        require(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "sampling.top_p", self.top_p,
                "a number in (0, 1] (1 turns nucleus sampling off)")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def sample_tokens(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Draw one token per row from ``logits [B, V]``; returns ``[B]`` int32.

    Greedy: ``argmax_v logits[b, v]``. Otherwise ``token ~ softmax(logits / temperature)`` restricted
    to the top-k tokens and then to the nucleus (see :func:`nucleus_mask`).
    """
    logits = logits.astype(jnp.float32)  # [B, V]
    if sampling.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / sampling.temperature  # [B, V]
    vocab_size = scaled.shape[-1]
    keep = min(sampling.top_k, vocab_size) if sampling.top_k else vocab_size
    if keep == vocab_size and sampling.top_p >= 1.0:
        return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    sorted_logits, sorted_ids = jax.lax.top_k(scaled, keep)  # [B, keep] each, most likely first
    if sampling.top_p < 1.0:
        sorted_logits = jnp.where(nucleus_mask(sorted_logits, sampling.top_p), sorted_logits, -jnp.inf)
    choice = jax.random.categorical(rng, sorted_logits, axis=-1)  # [B] index into the sorted list
    return jnp.take_along_axis(sorted_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def nucleus_mask(sorted_logits: jax.Array, top_p: float) -> jax.Array:
    """Which tokens of a descending-sorted ``[B, K]`` logit list form the nucleus.

    With ``p = softmax(sorted_logits)``, token i is kept iff ``sum_{j<i} p_j < top_p``: the smallest
    prefix whose probability reaches ``top_p``. The most likely token is always kept.
    """
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)  # [B, K]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, K] exclusive cumulative sum
    return mass_before < top_p
