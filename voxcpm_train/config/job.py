"""Root config of `voxcpm-train`: run/train keys plus one field per config group."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from voxcpm_train.config.checkpoint import CheckpointConfig
from voxcpm_train.config.logging import LoggingConfig
from voxcpm_train.config.optim import OptimConfig
from voxcpm_train.config.parallel import ParallelConfig
from voxcpm_train.config.peft import PeftConfig
from voxcpm_train.config.platform import PlatformConfig
from voxcpm_train.config.stage import StageConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"        # everything of a run: config, checkpoints, metrics, samples
    name: Optional[str] = None       # wandb run name; None = basename of run.dir


@dataclass
class TrainConfig:
    max_steps: int = 100             # train until this global optimizer step (across stages)
    seed: int = 1234                 # weights, data order and flow-matching draws derive from it


def _model_type():
    try:
        from voxcpm_train.config.model import ModelConfig
        return ModelConfig
    except ImportError:  # pragma: no cover - the model package is built in parallel
        return Any


def _data_type():
    try:
        from data_pipeline.config import DataConfig
        return DataConfig
    except ImportError:  # pragma: no cover
        return Any


ModelT = _model_type()
DataT = _data_type()


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelT = MISSING          # configs/model/*.yaml (voxcpm_train.config.model.ModelConfig)
    data: DataT = field(default_factory=DataT)   # configs/data/*.yaml (data_pipeline.config.DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)   # configs/peft/*.yaml: LoRA, frozen modules


def register() -> None:
    """Store the root schema (`job_schema`, first in configs/config.yaml's defaults) and the data schema."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    try:
        from data_pipeline import config as data_config
    except ImportError:  # pragma: no cover
        return
    if hasattr(data_config, "register"):
        data_config.register()
    else:
        cs.store(group="data", name="data_schema", node=data_config.DataConfig)


def validate_job_config(cfg) -> None:
    """Cross-key checks that types alone cannot express; raises ConfigError naming the key."""
    from voxcpm_train.config.model import ConfigError, validate_model_config
    from voxcpm_train.config.optim import PRECISION_CHOICES
    from voxcpm_train.config.parallel import RECOMPUTE_CHOICES
    from voxcpm_train.config.platform import PLATFORM_CHOICES
    from voxcpm_train.config.logging import WANDB_MODES
    from voxcpm_train.config.stage import WSD_DECAY_STYLES

    def check(ok, msg):
        if not ok:
            raise ConfigError(msg)

    p = cfg.parallel
    for key in ("tp", "pp", "micro_batch_size", "global_batch_size"):
        check(getattr(p, key) >= 1, f"parallel.{key}={getattr(p, key)} must be >= 1")
    check(p.dp is None or p.dp >= 1, f"parallel.dp={p.dp} must be >= 1 or null")
    check(p.recompute in RECOMPUTE_CHOICES, f"parallel.recompute={p.recompute!r} must be one of {RECOMPUTE_CHOICES}")
    check(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1")
    check(cfg.optim.precision in PRECISION_CHOICES,
          f"optim.precision={cfg.optim.precision!r} must be one of {PRECISION_CHOICES}")
    check(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0")
    for k, v in cfg.optim.lr_mult.items():
        check(v > 0, f"optim.lr_mult.{k}={v} must be > 0")
    check(cfg.platform.device in PLATFORM_CHOICES,
          f"platform.device={cfg.platform.device!r} must be one of {PLATFORM_CHOICES}")
    check(cfg.logging.wandb_mode in WANDB_MODES,
          f"logging.wandb_mode={cfg.logging.wandb_mode!r} must be one of {WANDB_MODES}")
    s = cfg.stage
    check(s.lr_wsd_decay_style in WSD_DECAY_STYLES,
          f"stage.lr_wsd_decay_style={s.lr_wsd_decay_style!r} must be one of {WSD_DECAY_STYLES}")
    check(s.global_batch_mult >= 1, f"stage.global_batch_mult={s.global_batch_mult} must be >= 1")
    check(s.lr_warmup_steps >= 0, f"stage.lr_warmup_steps={s.lr_warmup_steps} must be >= 0")
    check(s.decay_steps >= -1, f"stage.decay_steps={s.decay_steps} must be >= 0 (or -1 = whole stage)")
    check(cfg.train.max_steps >= 1, f"train.max_steps={cfg.train.max_steps} must be >= 1")
    check(cfg.checkpoint.every >= 0, f"checkpoint.every={cfg.checkpoint.every} must be >= 0")
    check(cfg.checkpoint.keep_last >= 0, f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 0")
    check(bool(cfg.run.dir), "run.dir must be set")
    validate_model_config(cfg.model, "model")
    from voxcpm_train.config.peft import validate_peft_config

    validate_peft_config(cfg.peft)
