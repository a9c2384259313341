"""Pallas kernels for PaTH attention: ``path_attention_pallas`` (custom VJP entry), per-backend ``path_blocks``."""

from pallas_kernels.path.api import path_attention_pallas
from pallas_kernels.path.blocks import path_blocks

__all__ = ["path_attention_pallas", "path_blocks"]
