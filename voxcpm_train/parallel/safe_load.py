"""Read torch_dist checkpoints without unpickling arbitrary objects.

PyTorch's distributed checkpoint reader (used by megatron's torch_dist strategy) reads the
``.metadata`` file with ``pickle.load`` and non-tensor items with ``torch.load(weights_only=False)``.
While :func:`safe_dcp_reading` is active:

* ``.metadata`` is read by an unpickler that only resolves the checkpoint-metadata classes of
  ``torch.distributed.checkpoint`` plus ``torch.Size``, dtypes, layouts and memory formats;
* non-tensor items go through ``torch.load(weights_only=True)``.

The swap is confined to the two torch modules' own references (``filesystem.pickle``,
``default_planner.torch``) and undone on exit. Tensor data is already read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import types

import torch

__all__ = ["safe_dcp_reading", "MetadataUnpickler"]

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_EXTRA_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                  ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}
_LOCK = threading.RLock()


class MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata``: classes of the metadata modules and torch scalars only."""

    def find_class(self, module, name):
        if "." not in name:
            if module in _METADATA_MODULES:
                obj = getattr(__import__(module, fromlist=[name]), name, None)
                if isinstance(obj, type):
                    return obj
            elif module == "torch":
                obj = getattr(torch, name, None)
                if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                    return obj
            if (module, name) in _EXTRA_ALLOWED:
                return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a checkpoint may not contain"
        )


def _safe_pickle() -> types.ModuleType:
    ns = types.ModuleType("pickle", "pickle with a restricted load for DCP metadata")
    ns.__dict__.update(pickle.__dict__)
    ns.load = lambda file, **kwargs: MetadataUnpickler(file).load()
    return ns


def _safe_torch() -> types.ModuleType:
    ns = types.ModuleType("torch", "torch with torch.load forced to weights_only=True")
    ns.__getattr__ = lambda name: getattr(torch, name)

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return torch.load(*args, **kwargs)

    ns.load = load
    return ns


@contextlib.contextmanager
def safe_dcp_reading():
    """Make torch_dist checkpoint reads safe for the duration of the block."""
    from torch.distributed.checkpoint import default_planner, filesystem

    with _LOCK:
        saved = filesystem.pickle, default_planner.torch
        filesystem.pickle, default_planner.torch = _safe_pickle(), _safe_torch()
        try:
            yield
        finally:
            filesystem.pickle, default_planner.torch = saved
