"""Flax NNX modules that own parameters and call ``jaxlm.ops``."""

from jaxlm.layers.attention import Attention
from jaxlm.layers.embed import Embed, dense
from jaxlm.layers.mlp import SwiGLU
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.registry import mixer_class, register_mixer, registered_mixers

__all__ = ["Attention", "Embed", "RMSNorm", "SwiGLU", "dense", "mixer_class", "register_mixer", "registered_mixers"]
