"""Pure jnp math on arrays shaped ``[batch, seq, heads, dim]``; layers call these (the public ops contract)."""

from jaxlm.ops.attention import attention
from jaxlm.ops.conv import causal_conv1d, causal_conv1d_step
from jaxlm.ops.delta_rule import gated_delta_rule, gated_delta_rule_step
from jaxlm.ops.loglinear import (loglinear_gated_delta_rule, loglinear_gated_delta_rule_step, loglinear_ssd,
                                 loglinear_ssd_step)
from jaxlm.ops.norms import rms_norm
from jaxlm.ops.path import path_attention, path_decode_step, path_prefill_keys
from jaxlm.ops.rope import apply_rope
from jaxlm.ops.ssd import ssd, ssd_step

__all__ = ["apply_rope", "attention", "causal_conv1d", "causal_conv1d_step", "gated_delta_rule",
           "gated_delta_rule_step", "loglinear_gated_delta_rule", "loglinear_gated_delta_rule_step", "loglinear_ssd",
           "loglinear_ssd_step", "path_attention", "path_decode_step", "path_prefill_keys", "rms_norm", "ssd",
           "ssd_step"]
