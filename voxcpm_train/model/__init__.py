"""megatron-core modules of the VoxCPM backbone (see `voxcpm.py` for the module names).

Imports are lazy so `voxcpm_train.model.cli` can set up the platform before megatron is imported.
"""

import importlib

_EXPORTS = {
    "VoxCPMModel": "voxcpm_train.model.voxcpm",
    "FlowDraws": "voxcpm_train.model.losses",
    "combine_losses": "voxcpm_train.model.losses",
    "draw_flow_noise": "voxcpm_train.model.losses",
    "StageLayers": "voxcpm_train.model.pipeline",
    "stage_layer_counts": "voxcpm_train.model.pipeline",
    "stage_layers": "voxcpm_train.model.pipeline",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'voxcpm_train.model' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
