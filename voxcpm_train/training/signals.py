"""SIGTERM / SIGUSR1 (Slurm preemption, `scancel --signal`, `sbatch --signal`): flag, then the loop
checkpoints at the end of the current step (all ranks agree through an all-reduce) and exits."""
from __future__ import annotations

import signal


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        for sig in self.SIGNALS:
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def reset(self) -> None:
        self.received = None
