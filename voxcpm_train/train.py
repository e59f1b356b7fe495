"""`voxcpm-train`: the Hydra app. `voxcpm-train experiment=demo run.dir=runs/x train.max_steps=20`.

Config tree: the repository's configs/ (groups model, data, parallel, optim, stage, platform, logging,
checkpoint, peft, experiment), installed with the package as `voxcpm_train.configs` so the command works from
any directory; add your own tree with `--config-dir DIR` (see docs/launch.md). Launch one process per
device (torchrun / srun).
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from voxcpm_train.config import CONFIG_PACKAGE, register_configs

register_configs()
log = logging.getLogger("voxcpm_train")


@hydra.main(config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from voxcpm_train.config.job import build_job
    from voxcpm_train.config.model import ConfigError

    try:   # typed (checked by the merge), validated, paths resolved and checked, model from the checkpoint
        job = build_job(cfg, HydraConfig.get().overrides.task)
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
