"""Megatron optimizer (distributed or not) and LR/WD scheduler."""

from __future__ import annotations

import torch

__all__ = ["build_optimizer", "build_scheduler", "inner_optimizers"]


def build_optimizer(opt_config, model_chunks: list, config_overrides=None):
    """``get_megatron_optimizer`` over the DDP chunks, and hook the chunks' config to it.

    Sets ``finalize_model_grads_func`` (DP all-reduce / reduce-scatter, per-token scaling),
    ``grad_scale_func`` and ``no_sync_func`` on the model config, as Megatron-LM's trainer does.
    ``opt_config.use_distributed_optimizer`` must match the DDP config. ``config_overrides``:
    megatron's per-parameter-group overrides (e.g. LR multipliers), passed through.
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.utils import get_model_config

    ddp_config = model_chunks[0].ddp_config
    if opt_config.use_distributed_optimizer != ddp_config.use_distributed_optimizer:
        raise ValueError(
            "OptimizerConfig.use_distributed_optimizer="
            f"{opt_config.use_distributed_optimizer} but DistributedDataParallelConfig has "
            f"{ddp_config.use_distributed_optimizer}"
        )
    low_precision = any(p.dtype != torch.float32 for c in model_chunks for p in c.parameters())
    if low_precision and not (opt_config.bf16 or opt_config.fp16):
        raise ValueError("model parameters are not fp32: set OptimizerConfig.bf16=True")
    optimizer = get_megatron_optimizer(opt_config, model_chunks, config_overrides=config_overrides)
    config = get_model_config(model_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return optimizer


def build_scheduler(optimizer, *, max_lr: float, min_lr: float = 0.0, init_lr: float = 0.0,
                    warmup: int = 0, decay: int = 1, decay_style: str = "constant",
                    weight_decay: float = 0.0, wsd_decay: int | None = None,
                    wsd_decay_style: str | None = None):
    """``OptimizerParamScheduler``; ``warmup``/``decay``/``wsd_decay`` in the unit of
    ``scheduler.step(increment)`` (samples in Megatron-LM, steps if you pass 1)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    for group in optimizer.param_groups:  # groups carry their own bounds; fill unset ones
        if group.get("max_lr") is None:
            group["max_lr"] = max_lr
        if group.get("min_lr") is None:
            group["min_lr"] = min_lr
    return OptimizerParamScheduler(
        optimizer,
        init_lr=init_lr,
        max_lr=max_lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(decay, 1),
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay,
        lr_wsd_decay_style=wsd_decay_style,
    )


def inner_optimizers(optimizer) -> list:
    """The megatron optimizers inside a (possibly) ChainedOptimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))
