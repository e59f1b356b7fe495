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
    recompute: str = "none"          # none | selective | full
    micro_batch_size: int = 1        # rows per micro-batch per data-parallel rank
    global_batch_size: int = 8       # rows per optimizer step (all ranks, all micro-batches)
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False


RECOMPUTE_CHOICES = ("none", "selective", "full")
