"""Training configuration: frozen dataclasses, each validated once at start-up.

Every ``validate()`` returns ``self`` or raises ``ConfigError("section.field", value, allowed)``.
"""

from __future__ import annotations

import dataclasses
import math

from jaxlm.errors import is_finite_number, is_int, require

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay, and global-norm gradient clipping.

    Fields:
        learning_rate: peak learning rate, reached at the end of warmup.
        warmup_steps: steps of the linear warmup from 0 to ``learning_rate``.
        decay_steps: step at which the cosine reaches ``learning_rate * min_lr_ratio`` (counted from
            step 0, warmup included); 0 means the total number of training steps.
        min_lr_ratio: final learning rate as a fraction of the peak, in [0, 1].
        b1, b2: Adam exponential decay rates of the first and second moments, in [0, 1).
        eps: Adam denominator epsilon (> 0).
        weight_decay: decoupled weight decay (AdamW), applied to matrices only (see
            ``jaxlm.train.optim.weight_decay_mask``).
        grad_clip_norm: clip gradients to this global L2 norm; 0 turns clipping off.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0

    def validate(self) -> "OptimizerConfig":
        """Raise ConfigError naming the first bad field; return self when all are valid."""
        require(is_finite_number(self.learning_rate) and self.learning_rate > 0,
                "optimizer.learning_rate", self.learning_rate, "a positive number")
        require(is_int(self.warmup_steps) and self.warmup_steps >= 0,
                "optimizer.warmup_steps", self.warmup_steps, "a non-negative integer")
        require(is_int(self.decay_steps) and self.decay_steps >= 0,
                "optimizer.decay_steps", self.decay_steps, "0 (the total train steps) or a positive integer")
        require(self.decay_steps == 0 or self.decay_steps > self.warmup_steps, "optimizer.decay_steps",
                self.decay_steps, f"0 or an integer larger than optimizer.warmup_steps={self.warmup_steps}")
        require(is_finite_number(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0,
                "optimizer.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            require(is_finite_number(value) and 0.0 <= value < 1.0, f"optimizer.{name}", value, "a number in [0, 1)")
        require(is_finite_number(self.eps) and self.eps > 0, "optimizer.eps", self.eps, "a positive number")
        require(is_finite_number(self.weight_decay) and self.weight_decay >= 0,
                "optimizer.weight_decay", self.weight_decay, "a non-negative number")
        require(is_finite_number(self.grad_clip_norm) and self.grad_clip_norm >= 0,
                "optimizer.grad_clip_norm", self.grad_clip_norm, "0 (no clipping) or a positive number")
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the device mesh axes ``("data", "fsdp", "tensor")``.

    Fields:
        data: data-parallel replicas (batch split, params replicated); -1 takes all devices left over.
        fsdp: fully-sharded data parallelism (batch split, params and optimizer state sharded on
            ``embed``); -1 takes all devices left over.
        tensor: tensor parallelism (``heads``/``mlp``/``vocab`` split); -1 takes all devices left over.

    At most one field may be -1; the product of the sizes must equal the number of devices.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> "MeshConfig":
        """Check each size is positive or -1 and at most one is -1; return self."""
        for name in MESH_AXES:
            value = getattr(self, name)
            require(is_int(value) and (value > 0 or value == -1), f"mesh.{name}", value,
                    "a positive integer or -1 (all remaining devices)")
        wildcards = [name for name in MESH_AXES if getattr(self, name) == -1]
        require(len(wildcards) <= 1, f"mesh.{wildcards[-1] if wildcards else 'data'}", -1,
                f"-1 in at most one of {MESH_AXES} (got -1 in {wildcards})")
        return self

    def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
        """The (data, fsdp, tensor) sizes for ``num_devices`` devices, with -1 resolved.

        Raises ConfigError naming the field when the sizes cannot multiply to ``num_devices``.
        """
        self.validate()
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        fixed = math.prod(size for size in sizes.values() if size != -1)
        wildcard = next((name for name, size in sizes.items() if size == -1), None)
        if wildcard is not None:
            require(num_devices % fixed == 0, f"mesh.{wildcard}", -1,
                    f"-1 needs the other mesh sizes (product {fixed}) to divide the device count {num_devices}")
            sizes[wildcard] = num_devices // fixed
        product = math.prod(sizes.values())
        if product != num_devices:
            # Name the largest axis: it is the one most likely mistyped.
            field = max(MESH_AXES, key=lambda name: sizes[name])
            require(False, f"mesh.{field}", sizes[field],
                    f"sizes with data*fsdp*tensor equal to the device count {num_devices} "
                    f"(got {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']}={product}); use -1 to fill one axis")
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop and step.

    Fields:
        steps: total optimizer steps (also the cosine decay length when optimizer.decay_steps is 0).
        grad_accum_steps: micro-batches per optimizer step; the global batch is split into this many
            equal micro-batches whose gradients are summed before one update (memory / batch trade).
        z_loss_weight: weight of the z-loss ``mean(logsumexp(logits)^2)`` over scored tokens; 0 off.
        seed: seed of parameter initialisation and data order.
        log_every: steps between metric logs.
        eval_every: steps between evaluations; 0 turns evaluation off.
        eval_batches: batches per evaluation.
        output_dir: directory for checkpoints and logs.
    """

    steps: int = 1000
    grad_accum_steps: int = 1
    z_loss_weight: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    output_dir: str = "runs/default"

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad field; return self when all are valid."""
        for name in ("steps", "grad_accum_steps", "log_every", "eval_batches"):
            value = getattr(self, name)
            require(is_int(value) and value > 0, f"train.{name}", value, "a positive integer")
        require(is_int(self.eval_every) and self.eval_every >= 0, "train.eval_every", self.eval_every,
                "0 (no evaluation) or a positive integer")
        require(is_finite_number(self.z_loss_weight) and self.z_loss_weight >= 0,
                "train.z_loss_weight", self.z_loss_weight, "a non-negative number")
        require(is_int(self.seed) and self.seed >= 0, "train.seed", self.seed, "a non-negative integer")
        require(isinstance(self.output_dir, str) and self.output_dir != "", "train.output_dir",
                self.output_dir, "a non-empty path")
        return self


