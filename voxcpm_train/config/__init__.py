"""Structured configs (dataclasses registered in Hydra's ConfigStore), one module per config group."""

from voxcpm_train.config.model import ConfigError, ModelConfig, validate_model_config

# The Hydra config tree: configs/ at the repository top level, installed as this package (setup.py).
CONFIG_PACKAGE = "voxcpm_train.configs"


def config_dir():
    """The installed config tree (`importlib.resources` Traversable; a directory on a normal install)."""
    from importlib.resources import files

    return files(CONFIG_PACKAGE)


def load_preset(group: str, schema, name_or_path: str, overrides=None):
    """`configs/<group>/<name>.yaml` of the installed tree (or a YAML path) merged onto the structured
    `schema` with dotlist `overrides` (keys without the group prefix), as a `schema` instance; a wrong key
    or value is a `ConfigError` naming it. (Its `defaults` list is ignored: a preset outside Hydra.)"""
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if not path.suffix:
        path = Path(str(config_dir() / group / f"{name_or_path}.yaml"))
    if not path.is_file():
        raise ConfigError(f"{group} preset {name_or_path!r}: file {path} not found")
    raw = OmegaConf.load(path)
    if "defaults" in raw:
        raw.pop("defaults")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw, OmegaConf.from_dotlist(list(overrides or [])))
    except Exception as err:  # omegaconf names the key in its message
        raise ConfigError(f"{group} preset {path}: {err}") from err
    return OmegaConf.to_object(merged)


def register_configs() -> None:
    """Register every structured config group in Hydra's ConfigStore."""
    from voxcpm_train.config import job, model

    model.register()
    job.register()


__all__ = ["CONFIG_PACKAGE", "ConfigError", "ModelConfig", "config_dir", "load_preset", "register_configs", "validate_model_config"]
