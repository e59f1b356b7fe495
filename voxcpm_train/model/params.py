"""Per-component parameter counts, keyed by the reference module names."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch

from voxcpm_train.config.model import ModelConfig

COMPONENTS = (
    "base_lm",
    "residual_lm",
    "feat_encoder",
    "feat_decoder",
    "fsq_layer",
    "enc_to_lm_proj",
    "lm_to_dit_proj",
    "res_to_dit_proj",
    "fusion_concat_proj",
    "stop_proj",
    "stop_head",
)
# Our modules counted under a reference component (the reference keeps the text embedding in base_lm).
ALIASES = {"text_embedding": "base_lm"}


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    """{component: count, ..., "total": count} over `model.named_parameters()`."""
    counts = OrderedDict((name, 0) for name in COMPONENTS)
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        key = ALIASES.get(top, top)
        if key not in counts:
            raise KeyError(f"parameter {name} belongs to no known component")
        counts[key] += param.numel()
    counts["total"] = sum(counts.values())
    return dict(counts)


def meta_model_parameter_counts(cfg: ModelConfig) -> Dict[str, int]:
    """Counts of the whole model (one stage, TP = 1) built on the meta device: no memory, no init.

    Needs megatron's parallel state (TP = PP = 1) initialised.
    """
    from voxcpm_train.model.voxcpm import VoxCPMModel

    with torch.device("meta"):
        model = VoxCPMModel(cfg, pre_process=True, post_process=True, pp_rank=0, pp_size=1)
    return count_parameters(model)
