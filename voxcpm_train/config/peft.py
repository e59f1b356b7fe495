"""`peft` config group: LoRA adapters and module freezing (`configs/peft/*.yaml`, default `none`).

LoRA (`method: lora`) adds `y += (alpha / rank) · B(A(x))` to the selected linears of the TSLM
(`base_lm`), RALM (`residual_lm`) and LocDiT (`feat_decoder`, its transformer stack) and to the named
top-level projections; A [rank, in] starts Kaiming-uniform, B [out, rank] at zero. See docs/lora.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

PEFT_METHODS = ("none", "lora")
# linears of a MiniCPM-4 layer (megatron names; linear_qkv is the fused q/k/v, linear_fc1 the fused gate/up)
LAYER_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# the stacks LoRA can target: config key -> module path of the stack in VoxCPMModel
LORA_STACKS = {
    "base_lm": "base_lm",
    "residual_lm": "residual_lm",
    "feat_decoder": "feat_decoder.estimator.decoder",
}
# plain projections LoRA can target (top-level nn.Linear modules of VoxCPMModel)
LORA_PROJECTIONS = ("enc_to_lm_proj", "lm_to_dit_proj", "res_to_dit_proj", "fusion_concat_proj")


def _attention_linears() -> List[str]:
    return ["linear_qkv", "linear_proj"]


@dataclass
class LoraConfig:
    rank: int = 8                    # r of every adapter (see `ranks` for per-group values)
    alpha: float = 16.0              # scaling alpha / rank (the reference's convention)
    dropout: float = 0.0             # dropout on the adapter output (training only)
    # per group: which layer linears get an adapter (subset of linear_qkv, linear_proj, linear_fc1, linear_fc2)
    base_lm: List[str] = field(default_factory=_attention_linears)
    residual_lm: List[str] = field(default_factory=_attention_linears)
    feat_decoder: List[str] = field(default_factory=_attention_linears)
    projections: List[str] = field(default_factory=list)   # subset of LORA_PROJECTIONS
    # group (base_lm | residual_lm | feat_decoder | projections) -> rank, overriding `rank` there
    ranks: Dict[str, int] = field(default_factory=dict)
    # false: every non-adapter parameter is frozen (the reference's LoRA training); true: the base
    # trains too (except `peft.freeze`), and only a merged export can carry the result
    train_base: bool = False

    def group_rank(self, group: str) -> int:
        return int(self.ranks.get(group, self.rank))


@dataclass
class PeftConfig:
    method: str = "none"             # none | lora
    # parameter-name prefixes (module paths of VoxCPMModel) to freeze, e.g. [feat_encoder, base_lm]:
    # no grads, no optimizer state. Works with and without LoRA.
    freeze: List[str] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def uses_lora(self) -> bool:
        return self.method == "lora"


def validate_peft_config(peft: PeftConfig, prefix: str = "peft") -> None:
    """Raise ConfigError naming the key of the first bad value."""
    from voxcpm_train.config.model import ConfigError

    def check(ok, msg):
        if not ok:
            raise ConfigError(msg)

    check(peft.method in PEFT_METHODS, f"{prefix}.method={peft.method!r} must be one of {PEFT_METHODS}")
    for name in peft.freeze:
        check(bool(name) and not name.startswith(".") and not name.endswith("."),
              f"{prefix}.freeze: {name!r} is not a module path (e.g. feat_encoder, base_lm)")
    lora = peft.lora
    check(lora.rank >= 1, f"{prefix}.lora.rank={lora.rank} must be >= 1")
    check(lora.alpha > 0, f"{prefix}.lora.alpha={lora.alpha} must be > 0")
    check(0.0 <= lora.dropout < 1.0, f"{prefix}.lora.dropout={lora.dropout} must be in [0, 1)")
    for group in LORA_STACKS:
        for name in getattr(lora, group):
            check(name in LAYER_LINEARS, f"{prefix}.lora.{group}: {name!r} is not one of {LAYER_LINEARS}")
    for name in lora.projections:
        check(name in LORA_PROJECTIONS, f"{prefix}.lora.projections: {name!r} is not one of {LORA_PROJECTIONS}")
    groups = (*LORA_STACKS, "projections")
    for group, rank in lora.ranks.items():
        check(group in groups, f"{prefix}.lora.ranks.{group}: not a LoRA group (one of {groups})")
        check(rank >= 1, f"{prefix}.lora.ranks.{group}={rank} must be >= 1")
    if peft.uses_lora:
        check(any(getattr(lora, g) for g in groups),
              f"{prefix}.method=lora but no target: set {prefix}.lora.base_lm / residual_lm / feat_decoder / projections")
