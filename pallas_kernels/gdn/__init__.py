"""Pallas kernels for the gated delta rule: ``gated_delta_rule_pallas`` (custom VJP entry), ``gdn_blocks`` /
``GDNBlocks`` (per-backend block sizes and launch parameters)."""

from pallas_kernels.gdn.api import gated_delta_rule_pallas
from pallas_kernels.gdn.blocks import GDNBlocks, gdn_blocks

__all__ = ["gated_delta_rule_pallas", "GDNBlocks", "gdn_blocks"]
