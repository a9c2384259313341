"""Options of the sequence mixers other than softmax attention, nested in ModelConfig.

Each mixer family reads its own section (``config.model.mamba2.state_dim`` and so on); a field left at 0
falls back to the model-wide value named in its comment. Every section validates its own fields.
"""

from __future__ import annotations

import dataclasses

from jaxlm.errors import is_int, require

LINEAR_IMPLS = ("recurrent", "chunked", "pallas", "auto")
PATH_IMPLS = ("naive", "blockwise", "pallas", "auto")


def _require_positive_ints(section: str, options, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        require(is_int(value) and value > 0, f"model.{section}.{name}", value, "a positive integer")


def _require_non_negative_ints(section: str, options, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        require(is_int(value) and value >= 0, f"model.{section}.{name}", value, "0 (the default) or a positive integer")


@dataclasses.dataclass(frozen=True)
class Mamba2Options:
    """Mamba-2 (SSD) mixer: inner width ``expand·d_model`` split into heads of ``head_dim`` (P);
    B and C of ``state_dim`` (N) shared by ``num_groups`` head groups; causal conv of ``conv_width``."""

    state_dim: int = 64
    head_dim: int = 64
    expand: int = 2
    num_groups: int = 1
    conv_width: int = 4
    chunk_size: int = 64
    impl: str = "chunked"

    def validate(self) -> "Mamba2Options":
        _require_positive_ints("mamba2", self, ("state_dim", "head_dim", "expand", "num_groups", "conv_width",
                                                "chunk_size"))
        require(self.impl in LINEAR_IMPLS, "model.mamba2.impl", self.impl, f"one of {LINEAR_IMPLS}")
        return self


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetOptions:
    """Gated DeltaNet mixer: ``num_heads`` (0: model.num_heads) heads with keys of ``key_dim`` (0:
    model head_dim) and values of ``value_dim`` (0: key_dim); short causal convs of ``conv_width``."""

    num_heads: int = 0
    key_dim: int = 0
    value_dim: int = 0
    conv_width: int = 4
    chunk_size: int = 64
    impl: str = "chunked"

    def validate(self) -> "GatedDeltaNetOptions":
        _require_non_negative_ints("gated_deltanet", self, ("num_heads", "key_dim", "value_dim"))
        _require_positive_ints("gated_deltanet", self, ("conv_width", "chunk_size"))
        require(self.impl in LINEAR_IMPLS, "model.gated_deltanet.impl", self.impl, f"one of {LINEAR_IMPLS}")
        return self


@dataclasses.dataclass(frozen=True)
class LogLinearOptions:
    """Log-linear variants (of mamba2 and gated_deltanet, whose sections give the rest): ``num_levels``
    Fenwick levels (0: ceil(log2 model.max_seq_len) + 1)."""

    num_levels: int = 0

    def validate(self) -> "LogLinearOptions":
        _require_non_negative_ints("loglinear", self, ("num_levels",))
        return self


@dataclasses.dataclass(frozen=True)
class PaTHOptions:
    """PaTH attention: Householder direction from a rank-``low_rank`` projection and a causal conv of
    ``conv_width``; ``forget_gate`` adds the FoX gate (PaTH-FoX); ``block_size`` of the blockwise form.
    ``householder=False`` drops the Householder branch (no w/β projections, β = 0): softmax attention
    without position encoding, which with the forget gate is the Forgetting Transformer (mixer ``fox``)."""

    low_rank: int = 32
    conv_width: int = 3
    forget_gate: bool = False
    householder: bool = True
    block_size: int = 64
    impl: str = "blockwise"

    def validate(self) -> "PaTHOptions":
        _require_positive_ints("path", self, ("low_rank", "conv_width", "block_size"))
        require(isinstance(self.forget_gate, bool), "model.path.forget_gate", self.forget_gate, "True or False")
        require(isinstance(self.householder, bool), "model.path.householder", self.householder, "True or False")
        require(self.impl in PATH_IMPLS, "model.path.impl", self.impl, f"one of {PATH_IMPLS}")
        return self
