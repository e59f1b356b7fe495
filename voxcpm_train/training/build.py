"""Model chunks (DDP) and the megatron optimizer of a job, with per-module LR multipliers."""
from __future__ import annotations

import dataclasses

import torch

from voxcpm_train.config.model import ConfigError


def comm_device() -> torch.device:
    """Where tensors for collectives live: CPU for gloo, the current accelerator for NCCL/HCCL."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator()
    return torch.device(acc.type, torch.accelerator.current_device_index())


def _precision(job, platform) -> str:
    if job.optim.precision != "auto":
        if job.optim.precision == "bf16" and platform.is_cpu:
            raise ConfigError("optim.precision=bf16 is not supported on platform.device=cpu (use fp32 or auto)")
        return job.optim.precision
    return "fp32" if platform.is_cpu else "bf16"


def stage_lrs(job, start=None) -> tuple[float, float]:
    max_lr = job.optim.lr if job.stage.max_lr is None else job.stage.max_lr
    min_lr = job.optim.min_lr if job.stage.min_lr is None else job.stage.min_lr
    return float(max_lr), float(min_lr)


def lr_mult_overrides(job, opt_config) -> dict:
    """megatron `config_overrides`: the standard ones (no weight decay on biases / 1-d params) plus one
    ParamKey per `optim.lr_mult` entry whose group carries `lr_mult`, `max_lr` and `min_lr`."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

    overrides = get_standard_config_overrides(opt_config)
    max_lr, min_lr = stage_lrs(job)
    for prefix, mult in sorted(job.optim.lr_mult.items()):
        key = ParamKey(name=(f"{prefix}.*", f"*.{prefix}.*"))
        overrides[key] = {"lr_mult": float(mult), "max_lr": max_lr * mult, "min_lr": min_lr * mult}
    return overrides


def apply_stage_lrs(optimizer, job, start=None) -> None:
    """Set every param group's max_lr/min_lr from the current stage (x its lr_mult).

    Loading an optimizer checkpoint restores the param groups of the stage that wrote it; a stage switch
    changes the LR range, so this runs after every load (before the scheduler is built)."""
    max_lr, min_lr = stage_lrs(job, start)
    for group in optimizer.param_groups:
        mult = float(group.get("lr_mult", 1.0))
        group["max_lr"] = max_lr * mult
        group["min_lr"] = min_lr * mult


def build_model_and_optimizer(job, platform, start):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.parallel.model import build_model_chunks
    from voxcpm_train.parallel import optim as popt

    precision = _precision(job, platform)
    bf16 = precision == "bf16"
    p = job.parallel

    model_cfg = job.model
    if p.recompute != "none":       # parallel.recompute drives the model's activation recompute
        model_cfg = dataclasses.replace(model_cfg, recompute_granularity=p.recompute)
    # optim.precision decides the compute dtype: bf16 weights/activations (fp32 main params, grads reduced
    # in fp32, fp32 Adam state in megatron's optimizer) or fp32 throughout
    model_cfg = dataclasses.replace(model_cfg, params_dtype="bfloat16" if bf16 else "float32")

    def provider(pre_process: bool, post_process: bool):
        model = VoxCPMModel(model_cfg, pre_process=pre_process, post_process=post_process,
                            sequence_parallel=bool(p.sequence_parallel))
        if not hasattr(model, "share_embeddings_and_output_weights"):
            model.share_embeddings_and_output_weights = False   # read by finalize_model_grads at PP > 1
        return model

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bf16,
        overlap_grad_reduce=bool(p.overlap_grad_reduce),
        use_distributed_optimizer=bool(p.use_distributed_optimizer),
    )
    chunks = build_model_chunks(provider, ddp_config, device=platform.device,
                                param_dtype=torch.bfloat16 if bf16 else torch.float32)
    max_lr, min_lr = stage_lrs(job, start)
    o = job.optim
    opt_config = OptimizerConfig(
        optimizer="adam", lr=max_lr, min_lr=min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=bool(p.use_distributed_optimizer),
    )
    overrides = lr_mult_overrides(job, opt_config)
    optimizer = popt.build_optimizer(opt_config, chunks, config_overrides=overrides)
    _check_lr_mult_names(chunks, job)
    return chunks, optimizer, opt_config


def _check_lr_mult_names(chunks, job) -> None:
    """An `optim.lr_mult` prefix that matches no parameter on any rank is a config error."""
    import fnmatch

    import torch.distributed as dist

    names = [n for c in chunks for n, _ in c.named_parameters()]
    for prefix in sorted(job.optim.lr_mult):
        hit = any(fnmatch.fnmatch(n, f"{prefix}.*") or fnmatch.fnmatch(n, f"*.{prefix}.*") for n in names)
        t = torch.tensor([1.0 if hit else 0.0], device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() == 0.0:
            raise ConfigError(f"optim.lr_mult.{prefix}: no model parameter is named {prefix}.* "
                              f"(top-level modules e.g. feat_decoder, feat_encoder, base_lm, residual_lm)")
