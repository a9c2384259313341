"""Language models built from ``jaxlm.layers``."""

from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import DecoderLM

__all__ = ["DecoderLM", "ModelConfig"]
