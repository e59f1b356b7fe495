"""The Hydra config tree of `voxcpm-train`, installed as the package `voxcpm_train.configs` (setup.py).

Edit the YAML files here; Python code reads them through `voxcpm_train.config.config_dir()`.
"""
