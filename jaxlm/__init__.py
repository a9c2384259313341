"""jaxlm: efficient language-model research in JAX/Flax."""

from flax import nnx as _nnx

# Parameters carry logical axis names ("embed", "mlp", ...) as metadata; jaxlm.parallel maps them to
# mesh axes explicitly, so variables are never sharded eagerly at creation.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"

from jaxlm.pure import functional, to_module  # noqa: E402  (exported as jaxlm.functional)

__all__ = ["functional", "to_module", "__version__"]
