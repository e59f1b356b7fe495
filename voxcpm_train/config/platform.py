"""`platform` config group: device kind and its process-group backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PlatformConfig:
    device: str = "auto"             # auto | cuda | npu | cpu
    threads: Optional[int] = None    # torch intra-op threads per process (cpu); None = leave as is
    deterministic: bool = False      # deterministic kernels where the platform has them


PLATFORM_CHOICES = ("auto", "cuda", "npu", "cpu")
