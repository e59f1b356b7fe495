"""`voxcpm-train`: the Hydra app. `voxcpm-train experiment=demo run.dir=runs/x train.max_steps=20`.

Config tree: configs/ (groups model, data, parallel, optim, stage, platform, logging, checkpoint,
peft, experiment). Launch one process per device (torchrun / srun); see docs/launch.md.
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from voxcpm_train.config import register_configs

register_configs()
log = logging.getLogger("voxcpm_train")


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    from voxcpm_train.config.job import validate_job_config
    from voxcpm_train.config.model import ConfigError

    try:
        job = OmegaConf.to_object(cfg)          # dataclasses (type checks already done by the merge)
        validate_job_config(job)
    except ConfigError as err:
        print(f"voxcpm-train: config error: {err}", file=sys.stderr)
        sys.exit(2)
    from voxcpm_train.training.loop import train

    try:
        train(job)
    except ConfigError as err:
        print(f"voxcpm-train: config error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":  # megatron's async checkpoint writer re-imports __main__ (spawn)
    main()
