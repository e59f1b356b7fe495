"""`logging` config group: console, metrics.jsonl, wandb, validation and audio samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class LoggingConfig:
    log_every: int = 1               # console line every N optimizer steps (metrics.jsonl: every step)
    wandb: bool = True
    wandb_mode: str = "offline"      # offline | online | disabled (WANDB_MODE in the env wins)
    wandb_project: str = "voxcpm-train"
    wandb_entity: Optional[str] = None
    val_every: int = 0               # validation loss every N steps (0 = off)
    val_batches: int = 2             # micro-batches per validation
    sample_every: int = 0            # generate audio for `sample_texts` every M steps (0 = off)
    sample_at_end: bool = True       # ... and once when train.max_steps is reached
    sample_texts: List[str] = field(default_factory=lambda: ["Hello, this is a test of the model."])
    sample_max_patches: int = 100    # generation length cap (positions; 6.25 per second at P=4)
    sample_cfg: float = 2.0
    sample_timesteps: int = 10
    loss_plot: bool = True           # loss-curve PNG in run.dir at the end
    peak_tflops: Optional[float] = None  # per-device peak for the MFU estimate; None = by device


WANDB_MODES = ("offline", "online", "disabled")
