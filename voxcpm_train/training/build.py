"""Model chunks (DDP) and the megatron optimizer of a job, with per-module LR multipliers."""
from __future__ import annotations

import dataclasses

import torch

from voxcpm_train.config.model import ConfigError
from voxcpm_train.parallel.state import any_rank
from voxcpm_train.training.curriculum import stage_lrs


def _precision(job, platform) -> str:
    if job.optim.precision != "auto":
        if job.optim.precision == "bf16" and platform.is_cpu:
            raise ConfigError("optim.precision=bf16 is not supported on platform.device=cpu (use fp32 or auto)")
        return job.optim.precision
    return "fp32" if platform.is_cpu else "bf16"


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


def cpu_offload_options(job, platform) -> dict:
    """megatron `OptimizerConfig` fields of `optim.cpu_offload` (HybridDeviceOptimizer: fp32 main params
    and Adam state of `optim.offload_fraction` of the trainable parameters in host memory, Adam step on
    the CPU), or {} when off. Raises ConfigError where megatron-core 0.16.1 cannot do it."""
    o = job.optim
    if not o.cpu_offload:
        return {}
    if platform.is_cpu:
        raise ConfigError("optim.cpu_offload=true needs an accelerator (platform.device=cuda|npu): on the cpu "
                          "platform the optimizer state is in host memory already")
    if not job.parallel.use_distributed_optimizer:
        raise ConfigError("optim.cpu_offload=true needs parallel.use_distributed_optimizer=true (megatron-core "
                          "offloads the distributed optimizer's shards)")
    if not 0.0 < o.offload_fraction <= 1.0:
        raise ConfigError(f"optim.offload_fraction={o.offload_fraction} must be in (0, 1]")
    from megatron.core.utils import get_te_version

    if get_te_version() is None:   # megatron's precision-aware optimizer path checks the TE version
        raise ConfigError("optim.cpu_offload=true needs Transformer Engine (megatron-core 0.16.1 offloads "
                          "through its precision-aware optimizer, which requires TE >= 2.1)")
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=float(o.offload_fraction),
                use_precision_aware_optimizer=True)


def run_model_config(job, precision: str):
    """The model config this run builds: `job.model` with the activation recompute of `parallel.recompute`
    (TSLM/RALM) and `parallel.recompute_local` (LocEnc/LocDiT) where set, and the compute dtype of
    `precision` (bf16 | fp32)."""
    p = job.parallel
    model_cfg = job.model
    if p.recompute != "none":        # parallel.recompute drives the model's activation recompute
        model_cfg = dataclasses.replace(model_cfg, recompute_granularity=p.recompute)
    if p.recompute_local != "none":  # parallel.recompute_local: that of the LocEnc/LocDiT layers
        model_cfg = dataclasses.replace(model_cfg, recompute_local_granularity=p.recompute_local)
    # optim.precision decides the compute dtype: bf16 weights/activations (fp32 main params, grads reduced
    # in fp32, fp32 Adam state in megatron's optimizer) or fp32 throughout
    return dataclasses.replace(model_cfg, params_dtype="bfloat16" if precision == "bf16" else "float32")


def build_model_and_optimizer(job, platform):
    """This rank's DDP model chunks and the megatron optimizer (stage LR range, `optim.lr_mult` groups)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.model.lora import apply_peft
    from voxcpm_train.parallel.model import build_model_chunks
    from voxcpm_train.parallel import optim as popt

    precision = _precision(job, platform)
    bf16 = precision == "bf16"
    p = job.parallel

    model_cfg = run_model_config(job, precision)
    peft_summaries = []

    def provider(pre_process: bool, post_process: bool):
        model = VoxCPMModel(model_cfg, pre_process=pre_process, post_process=post_process,
                            sequence_parallel=bool(p.sequence_parallel))
        # LoRA adapters and frozen modules (peft config), before DDP: frozen params get no grad buffer
        peft_summaries.append(apply_peft(model, job.peft, seed=job.train.seed))
        return model

    _check_overlap(job)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bf16,
        overlap_grad_reduce=bool(p.overlap_grad_reduce),
        overlap_param_gather=bool(p.overlap_param_gather),
        use_distributed_optimizer=bool(p.use_distributed_optimizer),
    )
    chunks = build_model_chunks(provider, ddp_config, device=platform.device,
                                param_dtype=torch.bfloat16 if bf16 else torch.float32)
    _check_peft(peft_summaries, job)
    max_lr, min_lr = stage_lrs(job)
    o = job.optim
    opt_config = OptimizerConfig(
        optimizer="adam", lr=max_lr, min_lr=min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=bool(p.use_distributed_optimizer),
        **cpu_offload_options(job, platform),
    )
    overrides = lr_mult_overrides(job, opt_config)
    optimizer = popt.build_optimizer(opt_config, chunks, config_overrides=overrides)
    _check_lr_mult_names(chunks, job)
    return chunks, optimizer


def _check_overlap(job) -> None:
    """The DDP overlap options at start-up, not at the first checkpoint."""
    p = job.parallel
    if getattr(p, "overlap_param_gather", False) and not p.use_distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")
    saves = job.checkpoint.every > 0 or job.checkpoint.save_at_end or job.checkpoint.exit_on_signal
    if p.overlap_grad_reduce and p.use_distributed_optimizer and saves:
        raise ConfigError(
            "parallel.overlap_grad_reduce=true splits the gradients into several DDP buckets, and megatron-core "
            "0.16 writes wrong distributed-optimizer checkpoints then (fixed upstream in Megatron-LM PR #5077): "
            "set parallel.use_distributed_optimizer=false, or overlap_grad_reduce=false, or disable checkpoints "
            "(checkpoint.every=0 checkpoint.save_at_end=false checkpoint.exit_on_signal=false)")


def _check_lr_mult_names(chunks, job) -> None:
    """An `optim.lr_mult` prefix that matches no parameter on any rank is a config error."""
    import fnmatch

    names = [n for c in chunks for n, _ in c.named_parameters()]
    for prefix in sorted(job.optim.lr_mult):
        hit = any(fnmatch.fnmatch(n, f"{prefix}.*") or fnmatch.fnmatch(n, f"*.{prefix}.*") for n in names)
        if not any_rank(hit):
            raise ConfigError(f"optim.lr_mult.{prefix}: no model parameter is named {prefix}.* "
                              f"(top-level modules e.g. feat_decoder, feat_encoder, base_lm, residual_lm)")


def _check_peft(summaries, job) -> None:
    """A `peft` entry that names nothing on any rank, or nothing left to train, is a config error;
    logs what is trained."""
    import logging

    from voxcpm_train.config.peft import LORA_PROJECTIONS

    entries = [f"peft.freeze: {prefix}" for prefix in job.peft.freeze]
    if job.peft.uses_lora:
        entries += [f"peft.lora.projections: {name}" for name in job.peft.lora.projections]
    unmatched = {u for s in summaries for u in s.unmatched}
    for entry in entries:
        if not any_rank(entry not in unmatched):
            raise ConfigError(f"{entry}: names no model parameter (top-level modules e.g. feat_encoder, "
                              f"base_lm, residual_lm, feat_decoder; LoRA projections {LORA_PROJECTIONS})")
    if not any_rank(sum(s.trainable for s in summaries) > 0):
        raise ConfigError("peft: every parameter is frozen (peft.freeze covers the whole model)")
    if job.peft.method != "none" or job.peft.freeze:
        for s in summaries:
            logging.getLogger("voxcpm_train").info(f"peft ({job.peft.method}): {s.describe()}")
