"""Decoder-only language model: embed -> pre-norm blocks (mixer per layer from config) -> norm -> logits."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.embed import Embed, dense
from jaxlm.layers.norms import RMSNorm
from jaxlm.models import ladder
from jaxlm.models.blocks import BlockSequence, ScannedLayers
from jaxlm.models.config import ModelConfig


class DecoderLM(nnx.Module):
    """``logits = head(final_norm(blocks(embed(tokens))))`` with ``head = lm_head`` or the tied ``embed.attend``.

    Attributes: ``embed``, ``layers`` (``BlockSequence``: ``layers.blocks[i]`` is layer i; or, with
    ``config.scan_layers``, ``ScannedLayers``: layer i is ``layers.groups.blocks[i % period]`` at
    stack index ``i // period``), ``final_norm`` and ``lm_head [embed, vocab]`` (absent when
    ``config.tie_embeddings``). Each layer's mixer is built by name from ``config.layer_mixers()``.
    ``config.residual_mode`` other than "standard" (or ``config.tp_shard_map``) wires the same blocks
    through ``jaxlm.models.ladder`` (tensor-parallel under a mesh set with ``jax.set_mesh``); the
    parameters are the same in every mode.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config.validate()
        self.embed = Embed(config, rngs=rngs)
        if config.scan_layers:
            self.layers = ScannedLayers(config, rngs=rngs)
        else:
            self.layers = BlockSequence(config, config.layer_mixers(), config.remat, rngs=rngs)
        self.final_norm = RMSNorm(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = dense(config, config.d_model, config.vocab_size, ("embed", "vocab"), rngs=rngs,
                                 output_dtype=jnp.float32)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Next-token logits ``[B, T, vocab]`` float32 for ``tokens [B, T]`` int32.

        ``positions [B, T]`` default to ``arange(T)`` per row. ``segment_ids [B, T]`` (None: one
        segment) make packed sequences independent; id 0 marks padding.
        """
        logits, _ = self._forward(tokens, positions, segment_ids, cache=None)
        return logits

    def decode(self, tokens: jax.Array, *, positions: jax.Array, cache: Any,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """The forward pass of ``__call__`` that also writes every mixer's state into ``cache``.

        Prefill: ``tokens [B, T]`` a right-padded prompt batch with ``positions = arange(T)`` and
        ``segment_ids [B, T]`` 1 on real tokens and 0 on padding (mixers with a recurrent state leave it
        unchanged on padding; attention needs no mask, since a padding slot is overwritten by the next real
        token at that position before any query can see it); decode step: ``T = 1`` with each row's next
        position. Returns (``[B, T, vocab]`` float32, new cache).
        """
        if positions is None:
            raise ValueError("DecoderLM.decode needs positions [B, T] (the absolute position of every token)")
        return self._forward(tokens, positions, segment_ids, cache=cache)

    def init_cache(self, batch_size: int, max_length: int) -> Any:
        """Empty decode state for ``batch_size`` rows of up to ``max_length`` tokens: one entry per layer
        (a tuple), or with ``scan_layers`` one per pattern position with arrays stacked on a leading
        layer axis."""
        return self.layers.init_cache(batch_size, max_length)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameter scalars; ``exclude_embeddings`` leaves out the ``[vocab, embed]`` tables
        (the token embedding and the untied ``lm_head``)."""
        total = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(self, nnx.Param)))
        if exclude_embeddings:
            total -= self.embed.embedding.size
            if not self.config.tie_embeddings:
                total -= self.lm_head.kernel.size
        return int(total)

    def _forward(self, tokens, positions, segment_ids, cache) -> tuple[jax.Array, Any]:
        x = self.embed(tokens)  # [B, T, d_model]
        if self.config.uses_tp_blocks:
            x, cache = ladder.apply_layers(self.layers, self.config, x, positions, segment_ids, cache)
        else:
            x, cache = self.layers(x, positions=positions, segment_ids=segment_ids, cache=cache)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.config.tie_embeddings else self.lm_head(x)  # [B, T, V]
        return logits.astype(jnp.float32), cache
