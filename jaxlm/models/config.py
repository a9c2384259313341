"""The decoder LM's configuration: a frozen dataclass, validated once at start-up."""

from __future__ import annotations

import dataclasses

from jaxlm.errors import require
from jaxlm.models.mixer_options import GatedDeltaNetOptions, LogLinearOptions, Mamba2Options, PaTHOptions

COMPUTE_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn")
# How each layer's modules add their outputs to the residual stream (jaxlm.models.ladder).
RESIDUAL_MODES = ("standard", "parallel", "ladder", "upper_bound")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only LM.

    ``layer_pattern`` lists mixer names repeated cyclically over the layers (e.g.
    ``("mamba2", "mamba2", "mamba2", "attention")`` for attention every 4th layer); empty means
    every layer uses ``mixer``. With ``scan_layers`` the model scans over repeats of the pattern.
    """

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 1024  # SwiGLU hidden width
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False
    mixer: str = "attention"
    layer_pattern: tuple[str, ...] = ()
    scan_layers: bool = False
    remat: str = "none"
    compute_dtype: str = "float32"
    attention_impl: str = "xla"
    init_std: float = 0.02
    residual_mode: str = "standard"
    ladder_start_layer: int = 0
    tp_shard_map: bool = False
    # Megatron sequence parallelism of the tensor-parallel blocks (jaxlm.models.ladder): training and
    # forward passes only; calls with a decode cache keep the all-reduce layout.
    tp_sequence_parallel: bool = False
    mamba2: Mamba2Options = Mamba2Options()
    gated_deltanet: GatedDeltaNetOptions = GatedDeltaNetOptions()
    loglinear: LogLinearOptions = LogLinearOptions()
    path: PaTHOptions = PaTHOptions()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def uses_tp_blocks(self) -> bool:
        """Whether the blocks run through ``jaxlm.models.ladder`` (explicit tensor-parallel residual wiring)."""
        return self.residual_mode != "standard" or self.tp_shard_map

    @property
    def mixer_pattern(self) -> tuple[str, ...]:
        """The mixers of one period of the layer pattern."""
        return tuple(self.layer_pattern) or (self.mixer,)

    def layer_mixers(self) -> tuple[str, ...]:
        """The mixer name of every layer."""
        pattern = self.mixer_pattern
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first bad field; return self when all are valid."""
        from jaxlm.layers.registry import registered_mixers

        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"model.{name}", value, "a positive integer")
        require(self.head_dim >= 0, "model.head_dim", self.head_dim, "0 (d_model // num_heads) or a positive integer")
        require(self.head_dim > 0 or self.d_model % self.num_heads == 0, "model.num_heads", self.num_heads,
                f"a divisor of model.d_model={self.d_model} when model.head_dim is 0")
        require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", self.num_kv_heads,
                f"a divisor of model.num_heads={self.num_heads}")
        require(self.resolved_head_dim % 2 == 0, "model.head_dim", self.resolved_head_dim, "an even number (RoPE rotates pairs)")
        known = registered_mixers()
        require(self.mixer in known, "model.mixer", self.mixer, f"one of {known}")
        for name in self.layer_pattern:
            require(name in known, "model.layer_pattern", self.layer_pattern, f"mixer names from {known}")
        if self.scan_layers:
            period = len(self.mixer_pattern)
            require(self.num_layers % period == 0, "model.num_layers", self.num_layers,
                    f"a multiple of the layer pattern length {period} when model.scan_layers is True")
        require(self.remat in REMAT_POLICIES, "model.remat", self.remat, f"one of {REMAT_POLICIES}")
        require(self.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype", self.compute_dtype, f"one of {COMPUTE_DTYPES}")
        require(self.attention_impl in ATTENTION_IMPLS, "model.attention_impl", self.attention_impl,
                f"one of {ATTENTION_IMPLS}")
        require(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "a positive number")
        require(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "a positive number")
        require(self.init_std > 0, "model.init_std", self.init_std, "a positive number")
        require(self.residual_mode in RESIDUAL_MODES, "model.residual_mode", self.residual_mode,
                f"one of {RESIDUAL_MODES}")
        require(isinstance(self.ladder_start_layer, int) and 0 <= self.ladder_start_layer < self.num_layers,
                "model.ladder_start_layer", self.ladder_start_layer,
                f"an integer in [0, model.num_layers={self.num_layers})")
        require(isinstance(self.tp_shard_map, bool), "model.tp_shard_map", self.tp_shard_map, "True or False")
        require(isinstance(self.tp_sequence_parallel, bool), "model.tp_sequence_parallel",
                self.tp_sequence_parallel, "True or False")
        require(not self.tp_sequence_parallel or self.uses_tp_blocks, "model.tp_sequence_parallel",
                self.tp_sequence_parallel, "False unless the blocks run through jaxlm.models.ladder "
                "(model.residual_mode != 'standard' or model.tp_shard_map=True)")
        require(self.ladder_start_layer == 0 or not self.scan_layers, "model.ladder_start_layer",
                self.ladder_start_layer, "0 when model.scan_layers is True (a scan repeats one residual wiring)")
        for options in (self.mamba2, self.gated_deltanet, self.loglinear, self.path):
            options.validate()
        return self
