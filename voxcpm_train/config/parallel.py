"""`parallel` config group: model/data parallel layout, batch sizes, recomputation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ParallelConfig:
    tp: int = 1                      # tensor model parallel size
    pp: int = 1                      # pipeline model parallel size
    dp: Optional[int] = None         # data parallel size; None = world_size / (tp * pp)
    sequence_parallel: bool = False  # megatron sequence parallelism (needs tp > 1)
    recompute: str = "none"          # none | selective | full: the TSLM/RALM layers
    recompute_local: str = "none"    # none | full: the LocEnc/LocDiT layers (model.recompute_local_granularity)
    micro_batch_size: int = 1        # rows per micro-batch per data-parallel rank
    global_batch_size: int = 8       # rows per optimizer step (all ranks, all micro-batches)
    use_distributed_optimizer: bool = True
    # Overlap the DP gradient reduce-scatter with the backward / the parameter all-gather with the next
    # forward (megatron DDP buckets; nothing to overlap at DP = 1). megatron-core 0.16 checkpoints the
    # distributed optimizer correctly with one DDP bucket only, which overlap_grad_reduce gives up: with
    # both set, checkpoints need use_distributed_optimizer=false (see docs/platform.md).
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # needs use_distributed_optimizer


RECOMPUTE_CHOICES = ("none", "selective", "full")
RECOMPUTE_LOCAL_CHOICES = ("none", "full")
