"""Model-parallel groups and seeding."""

from __future__ import annotations

import random

import torch
import torch.distributed as dist

__all__ = [
    "initialize_model_parallel", "destroy_model_parallel", "seed_everything", "pp_stage_flags",
    "comm_device", "any_rank", "all_ranks",
]


def initialize_model_parallel(
    tp: int = 1, pp: int = 1, *, seed: int | None = 1234, timeout_minutes: int = 30
) -> None:
    """Create megatron's TP/PP/DP groups (DP = world / (TP·PP)) and seed the RNGs.

    The default process group must be up (:func:`voxcpm_train.platform.init_distributed`).
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: torch.distributed is not initialised")
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by TP={tp} x PP={pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    if seed is not None:
        seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed python/torch and megatron's model-parallel RNG tracker (TP ranks get distinct states).

    The seed is offset by the PP rank (as in Megatron-LM) so stages do not share a stream.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def pp_stage_flags() -> tuple[bool, bool]:
    """(pre_process, post_process) of this rank's pipeline stage."""
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    )


def comm_device() -> torch.device:
    """Where tensors for collectives live: CPU for gloo, the current accelerator for NCCL/HCCL."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())


def _flag_reduce(flag: bool, op, group=None) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=op, group=group)
    return t.item() > 0.0


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when `flag` is true on at least one rank of `group` (default: all)."""
    return _flag_reduce(flag, dist.ReduceOp.MAX, group)


def all_ranks(flag: bool, group=None) -> bool:
    """True on every rank when `flag` is true on every rank of `group` (default: all)."""
    return _flag_reduce(flag, dist.ReduceOp.MIN, group)
