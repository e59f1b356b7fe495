"""Process-group start-up from torchrun or srun environments."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .core import Platform

__all__ = ["DistEnv", "dist_env", "init_distributed", "init_single_process"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _slurm_master_addr(env) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    # "node[01-04,07],other" -> "node01"; plain lists -> first entry.
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def dist_env(environ=None) -> DistEnv:
    """Rank/world/master from torchrun variables, falling back to SLURM_* (srun), then 1 process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1))
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR") or (_slurm_master_addr(env) if "SLURM_PROCID" in env else "127.0.0.1")
    port = int(env.get("MASTER_PORT", 29500))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return DistEnv(rank, world, local, addr, port)


def init_distributed(platform: Platform, timeout_s: float = 600.0) -> DistEnv:
    """Initialise the default process group with the platform's backend (no-op if already up)."""
    env = dist_env()
    if dist.is_initialized():
        return env
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        # a lone process (no launcher) takes a free port, so two such jobs on one machine don't collide
        os.environ["MASTER_PORT"] = str(_free_loopback_port())
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    kwargs = dict(
        backend=platform.backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if not platform.is_cpu:
        kwargs["device_id"] = torch.device(platform.kind, env.local_rank)
    dist.init_process_group(**kwargs)
    return env


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(seed: int = 1234) -> tuple[bool, bool]:
    """A world of one process (gloo, a free loopback port) with megatron's parallel state at TP = PP = 1,
    for tools, tests and benchmarks. Reuses whatever is already initialised; returns which of
    (process group, model-parallel state) it created so the caller can tear down only those."""
    from megatron.core import parallel_state, tensor_parallel

    made_pg = made_mp = False
    if not dist.is_initialized():
        port = _free_loopback_port()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        made_pg = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        made_mp = True
    return made_pg, made_mp
