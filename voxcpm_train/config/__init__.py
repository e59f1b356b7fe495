"""Structured configs (dataclasses registered in Hydra's ConfigStore), one module per config group."""

from voxcpm_train.config.model import ConfigError, ModelConfig, validate_model_config

# The Hydra config tree: configs/ at the repository top level, installed as this package (setup.py).
CONFIG_PACKAGE = "voxcpm_train.configs"


def config_dir():
    """The installed config tree (`importlib.resources` Traversable; a directory on a normal install)."""
    from importlib.resources import files

    return files(CONFIG_PACKAGE)


def register_configs() -> None:
    """Register every structured config group in Hydra's ConfigStore."""
    from voxcpm_train.config import job, model

    model.register()
    job.register()


__all__ = ["CONFIG_PACKAGE", "ConfigError", "ModelConfig", "config_dir", "register_configs", "validate_model_config"]
