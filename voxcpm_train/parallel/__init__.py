"""Distributed runtime on megatron-core: parallel state, model build per PP stage (+DDP),
optimizer/scheduler, one training step, and reshardable checkpoints. Model-agnostic: everything
takes a model provider ``provider(pre_process, post_process) -> MegatronModule``.

Call :func:`voxcpm_train.platform.setup_platform` before importing megatron (or this package's
functions, which import megatron lazily).
"""

from .checkpoint import LoadResult, is_complete_checkpoint, load_checkpoint, save_checkpoint
from .model import build_model_chunks, unwrap_model
from .optim import build_optimizer, build_scheduler, inner_optimizers
from .safe_load import safe_dcp_reading
from .state import destroy_model_parallel, initialize_model_parallel, pp_stage_flags, seed_everything
from .step import StepResult, train_step

__all__ = [
    "LoadResult",
    "StepResult",
    "build_model_chunks",
    "build_optimizer",
    "build_scheduler",
    "destroy_model_parallel",
    "initialize_model_parallel",
    "inner_optimizers",
    "is_complete_checkpoint",
    "load_checkpoint",
    "pp_stage_flags",
    "safe_dcp_reading",
    "save_checkpoint",
    "seed_everything",
    "train_step",
    "unwrap_model",
]
