"""Shared test fixtures. On a CPU-only machine the platform's CUDA redirection is installed before
megatron-core is imported (DESIGN §7)."""

import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxcpm_train.platform import setup_platform  # noqa: E402

PLATFORM = setup_platform("cpu" if not torch.cuda.is_available() else "auto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single():
    """A world of one process (gloo) with megatron's parallel state at TP = PP = 1."""
    from megatron.core import tensor_parallel

    from voxcpm_train.platform import init_single_process

    init_single_process()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield


def run_torchrun(script, *args, nproc: int = 2, timeout: float = 300.0, env: dict | None = None):
    """Launch ``script`` under torchrun (gloo, one thread per process; ``env`` added to the
    environment); raise with the log tail on failure or timeout. Returns the combined output."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-6000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-6000:]
        raise AssertionError(f"torchrun {script} timed out after {timeout}s\n{out}") from None
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-8000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def torchrun():
    """Fixture form of :func:`run_torchrun`."""
    return run_torchrun
