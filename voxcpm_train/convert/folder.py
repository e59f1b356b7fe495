"""The reference model folder (what ``VoxCPM2Model.from_local`` / ``VoxCPM.from_pretrained`` load).

    config.json            a ``VoxCPMConfig`` (``architecture`` field: voxcpm2 | voxcpm)
    model.safetensors      every weight but the AudioVAE, reference names (``pytorch_model.bin`` read too)
    audiovae.safetensors   the frozen AudioVAE (``audiovae.pth`` is read with weights_only=True)
    tokenizer files        ``LlamaTokenizerFast`` (tokenizer.json, tokenizer_config.json, ...), copied through

Nothing is unpickled: safetensors, or ``torch.load(weights_only=True)`` for the ``.pth``/``.bin``
fallbacks.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from voxcpm_train.convert.mapping import ConversionError

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "VAE_FILE",
    "ReferenceFolder",
    "read_reference_config",
    "read_reference_folder",
    "write_reference_folder",
    "export_reference_config",
    "DTYPES",
    "save_safetensors",
]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
MODEL_FILE_BIN = "pytorch_model.bin"
VAE_FILE = "audiovae.safetensors"
VAE_FILE_PTH = "audiovae.pth"
# Files that are not copied through as assets (weights are converted, the config is regenerated).
_NOT_ASSETS = {CONFIG_FILE, MODEL_FILE, MODEL_FILE_BIN, VAE_FILE, VAE_FILE_PTH}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

StateDict = Dict[str, torch.Tensor]


@dataclass
class ReferenceFolder:
    """A reference folder in memory. ``assets``: file name -> path of the files copied through."""

    config: dict
    weights: Optional[StateDict] = None
    audio_vae: Optional[StateDict] = None
    assets: Dict[str, Path] = field(default_factory=dict)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)   # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def save_safetensors(tensors: StateDict, path, metadata: Optional[dict] = None) -> Path:
    """``safetensors.torch.save_file``, then the file mode any other file gets (0644 under the usual
    umask 022): safetensors writes 0600, unreadable by the colleagues of a shared cluster."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    return Path(path)


def _torch_load_state(path: Path) -> StateDict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors (optionally under 'state_dict')")
    return dict(state)


def read_reference_config(path) -> dict:
    """``config.json`` of a folder as a dict; ``architecture`` defaults to ``voxcpm`` (v1 folders)."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE if path.is_dir() else path
    if not cfg_path.is_file():
        raise ConversionError(f"{cfg_path}: no config.json (not a reference model folder)")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key in ("lm_config", "encoder_config", "dit_config"):
        if key not in cfg:
            raise ConversionError(f"{cfg_path}: config.json has no {key!r} (not a VoxCPM config)")
    cfg.setdefault("architecture", "voxcpm")
    if cfg["architecture"] not in ("voxcpm2", "voxcpm"):
        raise ConversionError(f"{cfg_path}: architecture {cfg['architecture']!r} is not voxcpm2 or voxcpm")
    return cfg


def read_reference_folder(path, weights: bool = True) -> ReferenceFolder:
    """Read a reference folder: config, model weights (when ``weights``), AudioVAE weights, assets."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory")
    folder = ReferenceFolder(config=read_reference_config(path))
    if weights:
        if (path / MODEL_FILE).is_file():
            folder.weights = load_file(str(path / MODEL_FILE), device="cpu")
        elif (path / MODEL_FILE_BIN).is_file():
            folder.weights = _torch_load_state(path / MODEL_FILE_BIN)
        else:
            raise ConversionError(f"{path}: neither {MODEL_FILE} nor {MODEL_FILE_BIN} found")
        vae_keys = sorted(k for k in folder.weights if k.startswith("audio_vae."))
        if vae_keys:
            raise ConversionError(
                f"{path}: model weights hold AudioVAE keys ({len(vae_keys)}, e.g. {vae_keys[0]}); "
                f"the reference format keeps them in {VAE_FILE}"
            )
    if (path / VAE_FILE).is_file():
        folder.audio_vae = load_file(str(path / VAE_FILE), device="cpu")
    elif (path / VAE_FILE_PTH).is_file():
        folder.audio_vae = _torch_load_state(path / VAE_FILE_PTH)
    for item in sorted(path.iterdir()):
        if item.name in _NOT_ASSETS or item.name.startswith("."):
            continue
        if item.is_file():
            folder.assets[item.name] = item
        elif item.is_dir():
            folder.assets[item.name] = item
    return folder


def _drop_none_kv_channels(cfg: dict) -> None:
    # VoxCPMConfig declares `kv_channels: int = None`: an explicit null fails its validation.
    for key in ("lm_config", "encoder_config", "dit_config"):
        block = cfg.get(key)
        if isinstance(block, dict) and block.get("kv_channels", 0) is None:
            del block["kv_channels"]


def _fill_missing(ours: dict, original: dict) -> None:
    for key, value in original.items():
        if key not in ours:
            ours[key] = copy.deepcopy(value)
        elif isinstance(ours[key], dict) and isinstance(value, dict):
            _fill_missing(ours[key], value)


def export_reference_config(model_config, original: Optional[dict] = None, dtype: Optional[str] = None) -> dict:
    """``config.json`` for ``model_config``: the architecture from our config, everything we do not
    model (``audio_vae_config``, ``device``, the CFM inference settings) kept from ``original``."""
    from voxcpm_train.config.model import to_reference_config

    original = original or {}
    runtime_dtype = dtype or original.get("dtype", "bfloat16")
    cfg = to_reference_config(model_config, original.get("audio_vae_config"), dtype=runtime_dtype)
    orig_cfm = (original.get("dit_config") or {}).get("cfm_config")
    if orig_cfm:
        ours_cfm = cfg["dit_config"]["cfm_config"]
        cfg["dit_config"]["cfm_config"] = {**ours_cfm, **orig_cfm, "training_cfg_rate": ours_cfm["training_cfg_rate"]}
    _fill_missing(cfg, original)
    _drop_none_kv_channels(cfg)
    return cfg


def _copy_asset(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dst)


def write_reference_folder(path, folder: ReferenceFolder, dtype: Optional[str] = None) -> Path:
    """Write ``folder`` as a reference folder at ``path`` (created; existing files replaced).

    ``dtype`` (float32 | bfloat16 | float16) casts the model weights; None keeps theirs. The AudioVAE
    is written as ``audiovae.safetensors`` unchanged (it stays float32 in the reference).
    """
    path = Path(path)
    if folder.weights is None:
        raise ConversionError("write_reference_folder: no model weights")
    if folder.audio_vae is None:
        raise ConversionError(
            f"write_reference_folder: no AudioVAE weights ({VAE_FILE} or {VAE_FILE_PTH}); "
            "voxcpm cannot load a folder without them"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    path.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(folder.config)
    _drop_none_kv_channels(cfg)
    with open(path / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    weights = {
        k: (v.to(DTYPES[dtype]) if dtype else v).detach().cpu().contiguous() for k, v in folder.weights.items()
    }
    save_safetensors(weights, path / MODEL_FILE, metadata={"format": "pt"})
    save_safetensors(
        {k: v.detach().cpu().contiguous() for k, v in folder.audio_vae.items()},
        path / VAE_FILE,
        metadata={"format": "pt"},
    )
    for name, src in folder.assets.items():
        if name in _NOT_ASSETS:
            raise ConversionError(f"asset {name!r} would overwrite a converted file")
        _copy_asset(Path(src), path / name)
    return path
