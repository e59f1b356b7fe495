"""Which TSLM/RALM layers a pipeline stage holds.

The TSLM (`base_lm`, L_b layers) and RALM (`residual_lm`, L_r layers) form one list of L_b + L_r
layers split across PP stages: evenly (the first `(L_b + L_r) % pp` stages take one extra) or by
`model.pipeline_layers` (one count per stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from voxcpm_train.config.model import ConfigError, ModelConfig


@dataclass(frozen=True)
class StageLayers:
    """Layers of one stage, as [first, first + count) inside each stack."""

    base_first: int
    base_count: int
    residual_first: int
    residual_count: int
    holds_last_base_layer: bool  # this stage runs the TSLM final norm, FSQ and the RALM input fusion


def stage_layer_counts(cfg: ModelConfig, pp_size: int, override: Optional[List[int]] = None) -> List[int]:
    """Layer count of each of the `pp_size` stages."""
    total = cfg.lm.num_layers + cfg.residual_lm_num_layers
    counts = override if override is not None else cfg.pipeline_layers
    if counts is not None:
        counts = list(counts)
        if len(counts) != pp_size or sum(counts) != total or min(counts) < 0:
            raise ConfigError(
                f"model.pipeline_layers={counts} must have one count per pipeline stage ({pp_size}) "
                f"summing to lm.num_layers + residual_lm_num_layers = {total}"
            )
        return counts
    if pp_size > total:
        raise ConfigError(f"pipeline parallel size {pp_size} exceeds the {total} TSLM+RALM layers")
    base, extra = divmod(total, pp_size)
    return [base + (1 if stage < extra else 0) for stage in range(pp_size)]


def stage_layers(cfg: ModelConfig, pp_size: int, pp_rank: int, override: Optional[List[int]] = None) -> StageLayers:
    """The layers stage `pp_rank` of `pp_size` holds."""
    counts = stage_layer_counts(cfg, pp_size, override)
    start = sum(counts[:pp_rank])
    stop = start + counts[pp_rank]
    n_base = cfg.lm.num_layers
    base_first, base_stop = min(start, n_base), min(stop, n_base)
    res_first, res_stop = max(start, n_base) - n_base, max(stop, n_base) - n_base
    last_base_stage = max(s for s in range(pp_size) if sum(counts[:s]) < n_base) if n_base else 0
    return StageLayers(base_first, base_stop - base_first, res_first, res_stop - res_first, pp_rank == last_base_stage)
