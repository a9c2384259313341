"""Pallas kernels for SSD (Mamba-2): ``ssd_pallas`` (custom VJP entry), per-backend ``ssd_blocks``."""

from pallas_kernels.ssd.api import ssd_pallas
from pallas_kernels.ssd.blocks import ssd_blocks

__all__ = ["ssd_pallas", "ssd_blocks"]
