"""Pallas kernels for log-linear SSD (log-linear Mamba-2): ``loglinear_ssd_pallas`` (custom VJP entry),
per-backend ``loglinear_blocks``."""

from pallas_kernels.loglinear.api import loglinear_ssd_pallas
from pallas_kernels.loglinear.blocks import LogLinearBlocks, loglinear_blocks

__all__ = ["loglinear_ssd_pallas", "loglinear_blocks", "LogLinearBlocks"]
