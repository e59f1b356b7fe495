"""Device kind: ``cuda`` (NCCL), ``npu`` (torch_npu / HCCL) or ``cpu`` (gloo, development and CI)."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

__all__ = ["Platform", "KINDS", "detect_platform", "setup_platform", "current_platform"]

KINDS = ("auto", "cuda", "npu", "cpu")
_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
_CURRENT: "Platform | None" = None


@dataclass(frozen=True)
class Platform:
    """Where this process computes.

    ``kind``: cuda | npu | cpu; ``backend``: torch.distributed backend; ``local_rank``: device index
    on the node (0 on cpu).
    """

    kind: str
    backend: str
    local_rank: int = 0

    @property
    def device(self) -> torch.device:
        if self.kind == "cpu":
            return torch.device("cpu")
        # With transfer_to_npu, "cuda" strings are remapped; the native device type is "npu".
        return torch.device(self.kind, self.local_rank)

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    @property
    def param_dtype(self) -> torch.dtype:
        """Compute dtype of model weights: fp32 on CPU, bf16 on accelerators."""
        return torch.float32 if self.is_cpu else torch.bfloat16


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return hasattr(torch, "npu") and torch.npu.is_available()


def detect_platform(kind: str = "auto") -> str:
    """Resolve ``kind`` (auto|cuda|npu|cpu) to a concrete, available device kind."""
    kind = (kind or "auto").lower()
    if kind not in KINDS:
        raise ValueError(f"platform.device must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _npu_available():
            return "npu"
        return "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("platform.device=cuda but torch.cuda.is_available() is False")
    if kind == "npu" and not _npu_available():
        raise RuntimeError("platform.device=npu but torch_npu is not installed or sees no NPU")
    return kind


def _local_rank() -> int:
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def setup_platform(kind: str = "auto") -> Platform:
    """Select the device kind and prepare torch/megatron for it. Call before importing megatron.

    cuda: binds the process to ``cuda:LOCAL_RANK``. npu: imports ``torch_npu`` and its
    ``transfer_to_npu`` shim (cuda -> npu, nccl -> hccl), binds ``npu:LOCAL_RANK``. cpu: installs
    the redirection of megatron-core's CUDA calls (:mod:`.cpu_redirect`). Idempotent for one kind.
    """
    global _CURRENT
    resolved = detect_platform(kind)
    if _CURRENT is not None:
        if _CURRENT.kind != resolved:
            raise RuntimeError(f"platform already set up as {_CURRENT.kind!r}, asked for {resolved!r}")
        return _CURRENT
    if resolved == "cpu" and any(m.startswith("megatron.") for m in sys.modules):
        # Still works (loaded modules are patched in place), but objects megatron built at import
        # time with the real torch.cuda are not redirected.
        import warnings

        warnings.warn("setup_platform('cpu') called after megatron was imported", stacklevel=2)
    platform = Platform(resolved, _BACKENDS[resolved], _local_rank())
    if resolved == "cuda":
        torch.cuda.set_device(platform.local_rank)
    elif resolved == "npu":
        import torch_npu  # noqa: F401
        from torch_npu.contrib import transfer_to_npu  # noqa: F401

        torch.npu.set_device(platform.local_rank)
    else:
        from . import cpu_redirect

        cpu_redirect.apply()
    _CURRENT = platform
    return platform


def current_platform() -> Platform:
    """The platform set up in this process (raises if :func:`setup_platform` has not run)."""
    if _CURRENT is None:
        raise RuntimeError("setup_platform() has not been called in this process")
    return _CURRENT
