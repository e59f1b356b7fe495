"""Redirect megatron-core's hard-coded CUDA use to the CPU (cpu platform only).

megatron-core 0.16 assumes a CUDA device in many places (see docs/platform.md). On the cpu platform
we make those calls land on the CPU, touching as little as possible:

* every ``megatron.*`` module gets its own ``torch`` global: a copy of the ``torch`` namespace whose
  ``cuda`` is a CPU stand-in (``current_device``, ``synchronize``, RNG state, streams, events) and
  whose tensor factories map a CUDA ``device=`` to the CPU. torch itself and all non-megatron code
  keep the real module. Modules imported later are handled by an import hook.
* ``tensor_parallel.random``'s module-level CUDA RNG getter/setter are replaced by CPU ones (the
  originals queue a lazy CUDA call that never runs on a CPU build).
* ``Tensor.cuda`` and ``Tensor.type`` are methods, so they cannot be patched per module: they are
  wrapped globally, but the wrappers only change behaviour when the *caller* is a megatron module
  (``Tensor.cuda`` returns the tensor itself, ``Tensor.type()`` reports ``torch.cuda.*Tensor`` for a
  CPU tensor); every other caller gets the original method.

``apply()`` is idempotent; ``is_applied()`` reports the state.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import sys
import types

import torch

__all__ = ["apply", "is_applied", "CPU_TORCH", "CPU_CUDA"]

_APPLIED = False
_MEGATRON_PREFIX = "megatron."

# Tensor factories whose ``device=`` argument megatron sets to CUDA.
_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "empty_strided", "linspace", "eye", "randperm",
)


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare ordinal means a CUDA device to torch
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _map_device(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


def _wrap_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
            kwargs.pop("pin_memory", None)  # pinning needs an accelerator
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    factory.__doc__ = f"CPU-redirecting wrapper of torch.{factory.__name__}."
    return factory


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_manual_seed(seed) -> None:
    torch.manual_seed(seed)


def _make_cuda_namespace() -> types.ModuleType:
    real = torch.cuda
    ns = types.ModuleType("torch.cuda", "CPU stand-in of torch.cuda for megatron modules.")
    ns.__dict__.update({k: v for k, v in real.__dict__.items() if not k.startswith("__")})
    ns.__getattr__ = lambda name: getattr(real, name)
    _null_stream = _NullStream()
    ns.__dict__.update(
        current_device=lambda: torch.device("cpu"),
        set_device=lambda device: None,
        device_count=lambda: 1,
        synchronize=lambda device=None: None,
        empty_cache=lambda: None,
        get_rng_state=lambda device="cuda": torch.get_rng_state(),
        set_rng_state=lambda state, device="cuda": torch.set_rng_state(state),
        manual_seed=_cpu_manual_seed,
        manual_seed_all=_cpu_manual_seed,
        Stream=_NullStream,
        Event=_NullEvent,
        stream=lambda s=None: contextlib.nullcontext(),
        current_stream=lambda device=None: _null_stream,
        default_stream=lambda device=None: _null_stream,
        memory_allocated=lambda device=None: 0,
        max_memory_allocated=lambda device=None: 0,
        memory_reserved=lambda device=None: 0,
        max_memory_reserved=lambda device=None: 0,
        reset_peak_memory_stats=lambda device=None: None,
    )
    return ns


def _make_torch_namespace(cuda_ns: types.ModuleType) -> types.ModuleType:
    ns = types.ModuleType("torch", "CPU-redirecting view of torch for megatron modules.")
    ns.__dict__.update({k: v for k, v in torch.__dict__.items() if not k.startswith("__")})
    ns.__getattr__ = lambda name: getattr(torch, name)
    for name in _FACTORIES:
        ns.__dict__[name] = _wrap_factory(getattr(torch, name))
    ns.cuda = cuda_ns
    return ns


CPU_CUDA = _make_cuda_namespace()
CPU_TORCH = _make_torch_namespace(CPU_CUDA)


def _caller_is_megatron(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith(_MEGATRON_PREFIX)


def _patch_tensor_methods() -> None:
    orig_cuda, orig_type = torch.Tensor.cuda, torch.Tensor.type

    def cuda(self, *args, **kwargs):
        if _caller_is_megatron():
            return self if self.device.type == "cpu" else self.cpu()
        return orig_cuda(self, *args, **kwargs)

    def type_(self, *args, **kwargs):
        name = orig_type(self, *args, **kwargs)
        if not args and not kwargs and self.device.type == "cpu" and _caller_is_megatron():
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    cuda.__wrapped__, type_.__wrapped__ = orig_cuda, orig_type
    torch.Tensor.cuda = cuda
    torch.Tensor.type = type_


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _RngForkWarningFilter(logging.Filter):
    """On CPU the tracker's state *is* the CPU generator, so this warning is expected noise."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_module(module: types.ModuleType) -> None:
    g = module.__dict__
    if g.get("torch") is torch:
        g["torch"] = CPU_TORCH
    if module.__name__ == "megatron.core.tensor_parallel.random":
        g["_get_cuda_rng_state"] = _cpu_get_rng_state
        g["_set_cuda_rng_state"] = _cpu_set_rng_state
        logging.getLogger(module.__name__).addFilter(_RngForkWarningFilter())


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Patches each ``megatron.*`` module right after it is executed."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(_MEGATRON_PREFIX):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def apply() -> None:
    """Install the redirection (idempotent). Megatron modules already imported are patched too."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_tensor_methods()
    sys.meta_path.insert(0, _MegatronImportHook())
    for name, module in list(sys.modules.items()):
        if name.startswith(_MEGATRON_PREFIX) and isinstance(module, types.ModuleType):
            _patch_module(module)
    _APPLIED = True


def is_applied() -> bool:
    return _APPLIED
