"""`optim` config group: Adam hyper-parameters, clipping, precision, per-module LR multipliers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict


@dataclass
class OptimConfig:
    lr: float = 1e-4                 # peak (max) learning rate; a stage may override it
    min_lr: float = 1e-6             # floor of the decay; a stage may override it
    init_lr: float = 0.0             # learning rate at sample 0 (start of the warmup)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0           # global grad-norm clip (0 = off)
    # precision: auto = bf16 with fp32 main grads / optimizer state on cuda/npu, fp32 on cpu
    precision: str = "auto"          # auto | bf16 | fp32
    # per-module LR multipliers: name prefix of a parameter (below the model) -> multiplier,
    # e.g. {feat_decoder: 2.0}; applied through megatron's param-group overrides (max_lr/min_lr)
    lr_mult: Dict[str, float] = field(default_factory=dict)
    # megatron's optimizer CPU offload (HybridDeviceOptimizer): fp32 main params + Adam state of the
    # trainable parameters live in host memory and the Adam step runs there (`offload_fraction` of
    # them); needs parallel.use_distributed_optimizer and a cuda/npu platform. docs/lora.md
    cpu_offload: bool = False
    offload_fraction: float = 1.0


PRECISION_CHOICES = ("auto", "bf16", "fp32")
