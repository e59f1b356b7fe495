"""`checkpoint` config group."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class CheckpointConfig:
    every: int = 100                 # save every N optimizer steps (0 = only at the end / on signals)
    keep_last: int = 3               # keep the newest K complete checkpoints (0 = keep all)
    resume: bool = True              # resume from run.dir/checkpoints/latest when present
    load: Optional[str] = None       # start from this checkpoint dir instead (e.g. an import)
    # what `load` gives: null = an import gives the weights, a training checkpoint continues its run (step,
    # optimizer, data; another stage is a stage switch); true = the weights only, whatever it is (fine-tuning)
    load_weights_only: Optional[bool] = None
    save_at_end: bool = True
    exit_on_signal: bool = True      # SIGTERM/SIGUSR1: checkpoint, then exit (Slurm requeues)
    async_save: bool = False         # write the tensors in a forked process while training goes on
