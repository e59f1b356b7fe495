"""`stage` config group: one stage of the warmup-stable-decay curriculum.

The learning rate follows megatron's `OptimizerParamScheduler` (counting *samples*). A stage covers the
optimizer steps from where the previous stage stopped up to `train.max_steps`; its schedule is built
from this config and the stage start (saved in every checkpoint), see docs/curriculum.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional


@dataclass
class StageConfig:
    name: str = "pretrain"
    lr_warmup_steps: int = 0         # linear warmup from optim.init_lr; only a stage starting at step 0
    decay_steps: int = 0             # the last `decay_steps` steps decay (0 = stable, -1 = the whole stage)
    lr_wsd_decay_style: str = "cosine"   # linear | cosine | exponential | minus_sqrt
    max_lr: Optional[float] = None   # None = optim.lr
    min_lr: Optional[float] = None   # None = optim.min_lr
    global_batch_mult: int = 1       # global batch = parallel.global_batch_size * this
    # data blend of the stage: dataset name (in data.datasets) -> weight; empty = data config's blend
    blend: Dict[str, float] = field(default_factory=dict)


WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
