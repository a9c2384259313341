"""Pure jnp math on arrays shaped ``[batch, seq, heads, dim]``; layers call these."""

from jaxlm.ops.attention import attention
from jaxlm.ops.norms import rms_norm
from jaxlm.ops.rope import apply_rope

__all__ = ["apply_rope", "attention", "rms_norm"]
