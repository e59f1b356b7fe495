"""Package layout; the metadata is in pyproject.toml.

The Hydra config tree stays at the repository top level (`configs/`, the one place users edit) and ships
inside the package as `voxcpm_train.configs` (each config group a sub-package of YAML data), so every
console script finds it from any working directory, in editable and in wheel installs.
"""
from pathlib import Path

from setuptools import find_packages, setup

CONFIG_GROUPS = sorted(p.name for p in Path(__file__).parent.joinpath("configs").iterdir() if p.is_dir())
CONFIG_PACKAGES = ["voxcpm_train.configs"] + [f"voxcpm_train.configs.{g}" for g in CONFIG_GROUPS]

setup(
    packages=find_packages(include=["voxcpm_train*", "data_pipeline*"]) + CONFIG_PACKAGES,
    package_dir={"voxcpm_train.configs": "configs"},
    package_data={p: ["*.yaml"] for p in CONFIG_PACKAGES},
)
