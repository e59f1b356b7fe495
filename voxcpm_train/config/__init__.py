"""Structured configs (dataclasses registered in Hydra's ConfigStore), one module per config group."""

from voxcpm_train.config.model import ConfigError, ModelConfig, validate_model_config


def register_configs() -> None:
    """Register every structured config group in Hydra's ConfigStore."""
    from voxcpm_train.config import job, model

    model.register()
    job.register()


__all__ = ["ConfigError", "ModelConfig", "register_configs", "validate_model_config"]
