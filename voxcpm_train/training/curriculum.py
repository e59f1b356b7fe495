"""Warmup-stable-decay curriculum on megatron's `OptimizerParamScheduler`.

The scheduler counts *samples* (rows of a global batch). A stage runs from its start (the step and the
consumed samples where the previous stage stopped, 0 for the first) to `train.max_steps`; the stage's
`global_batch_mult` scales the global batch. Its schedule in megatron terms:

    max_lr, min_lr        stage.max_lr / stage.min_lr (default optim.lr / optim.min_lr)
    lr_warmup_steps       stage.lr_warmup_steps * gbs        (counted from step 0 of the run: in a stage
                                                              starting later it must be over, then 0)
    lr_decay_steps        start_samples + (max_steps - start_step) * gbs     (end of the stage)
    wsd_decay_steps       stage.decay_steps * gbs            (the last `decay_steps` steps decay;
                                                              -1 = the whole stage)
    lr_decay_style        "WSD", lr_wsd_decay_style = stage.lr_wsd_decay_style

The scheduler is stepped by the global batch after every optimizer step (skipped steps included, as in
megatron), so the lr of step s is the schedule at the samples consumed before s. On every resume the
saved scheduler state is loaded with `override_opt_param_scheduler=True`: the configured stage values win
(that is what a stage switch needs) and only `num_steps` (consumed samples) comes from the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from voxcpm_train.config.model import ConfigError


@dataclass(frozen=True)
class StageStart:
    """Where a stage began: saved in every checkpoint of the stage."""

    name: str
    step: int
    samples: int


def stage_global_batch(cfg) -> int:
    return int(cfg.parallel.global_batch_size) * int(cfg.stage.global_batch_mult)


def stage_lrs(cfg) -> tuple[float, float]:
    """(max_lr, min_lr) of the configured stage: `stage.max_lr`/`stage.min_lr` override `optim.lr`/`optim.min_lr`."""
    max_lr = cfg.optim.lr if cfg.stage.max_lr is None else cfg.stage.max_lr
    min_lr = cfg.optim.min_lr if cfg.stage.min_lr is None else cfg.stage.min_lr
    return float(max_lr), float(min_lr)


def scheduler_kwargs(cfg, start: StageStart) -> dict:
    """`OptimizerParamScheduler` keyword arguments of the configured stage begun at `start`."""
    stage, optim = cfg.stage, cfg.optim
    gbs = stage_global_batch(cfg)
    steps = int(cfg.train.max_steps) - start.step
    if steps <= 0:
        raise ConfigError(
            f"train.max_steps={cfg.train.max_steps} must be above the step {start.step} where stage "
            f"{stage.name!r} starts (train.max_steps is the global step to stop at, across stages)")
    # the warmup counts from step 0 of the run: in a later stage it must already be over (then no-op)
    warmup = int(stage.lr_warmup_steps) if start.step == 0 else 0
    if start.step > 0 and stage.lr_warmup_steps > start.step:
        raise ConfigError(
            f"stage.lr_warmup_steps={stage.lr_warmup_steps} counts from step 0 of the run, but stage "
            f"{stage.name!r} starts at step {start.step}: put the warmup in the first stage")
    decay_steps = steps if stage.decay_steps == -1 else int(stage.decay_steps)
    if not 0 <= decay_steps <= steps:
        raise ConfigError(f"stage.decay_steps={stage.decay_steps} exceeds the stage's {steps} steps")
    max_lr, min_lr = stage_lrs(cfg)
    if not 0.0 <= min_lr <= max_lr:
        raise ConfigError(f"stage.min_lr/optim.min_lr={min_lr} must lie in [0, max_lr={max_lr}]")
    if not 0.0 <= optim.init_lr <= max_lr:
        raise ConfigError(f"optim.init_lr={optim.init_lr} must lie in [0, max_lr={max_lr}]")
    horizon = start.samples + steps * gbs
    if warmup >= steps:   # a short run inside the warmup: megatron needs the decay end after the warmup
        if decay_steps:
            raise ConfigError(f"stage.decay_steps={stage.decay_steps} with stage.lr_warmup_steps={warmup} "
                              f">= the stage's {steps} steps: the decay would start inside the warmup")
        horizon = warmup * gbs + 1
    return dict(
        init_lr=float(optim.init_lr) if warmup else float(max_lr),
        max_lr=float(max_lr),
        min_lr=float(min_lr),
        lr_warmup_steps=warmup * gbs,
        lr_decay_steps=horizon,
        lr_decay_style="WSD",
        wsd_decay_steps=decay_steps * gbs,
        lr_wsd_decay_style=stage.lr_wsd_decay_style,
        start_wd=float(optim.weight_decay),
        end_wd=float(optim.weight_decay),
        wd_incr_steps=horizon,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def build_scheduler(optimizer, cfg, start: StageStart):
    """Megatron `OptimizerParamScheduler` of the stage (a checkpoint load then overrides only num_steps)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(optimizer, **scheduler_kwargs(cfg, start))
