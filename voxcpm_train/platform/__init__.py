"""The one place that knows the device kind (cuda | npu | cpu). See docs/platform.md.

``setup_platform`` must run before megatron is imported: on the cpu platform it installs the
redirection of megatron-core's hard-coded CUDA calls.
"""

from .core import KINDS, Platform, current_platform, detect_platform, setup_platform
from .distributed import DistEnv, dist_env, init_distributed, init_single_process

__all__ = [
    "KINDS",
    "Platform",
    "current_platform",
    "detect_platform",
    "setup_platform",
    "DistEnv",
    "dist_env",
    "init_distributed",
    "init_single_process",
]
