"""Pallas kernels for log-linear Gated DeltaNet: ``loglinear_gated_delta_rule_pallas`` (custom VJP entry),
per-backend ``loglinear_gdn_blocks``."""

from pallas_kernels.loglinear_gdn.api import loglinear_gated_delta_rule_pallas
from pallas_kernels.loglinear_gdn.blocks import LogLinearGDNBlocks, loglinear_gdn_blocks

__all__ = ["loglinear_gated_delta_rule_pallas", "loglinear_gdn_blocks", "LogLinearGDNBlocks"]
