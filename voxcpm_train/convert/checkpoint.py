"""Reference folder <-> megatron distributed checkpoint (torch_dist), in one process on CPU.

Import builds the whole model (TP = PP = 1), loads the converted weights into it with a strict key
and shape check, and saves it with :func:`voxcpm_train.parallel.checkpoint.save_checkpoint`
(weights only). torch_dist keys carry global layer numbers and global tensor shapes, so training
loads the result under any TP/PP/DP layout.

Export loads the model weights of any checkpoint of that format (an import, or a training
checkpoint that also holds optimizer state, which is not read) into the same TP = PP = 1 model and
maps them back to reference names.

An imported checkpoint directory::

    <dir>/model/ , extra_state.json , rank_state/   the checkpoint (voxcpm_train.parallel.checkpoint)
    <dir>/config.yaml                               {"model": ModelConfig}, as in training checkpoints
    <dir>/hf_assets/                                config.json of the source, audiovae.safetensors,
                                                    tokenizer files: what an export copies through

Both functions need the platform set up (``voxcpm_train.platform.setup_platform``) before megatron
is imported; the CLIs do it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

from voxcpm_train.convert.folder import (
    CONFIG_FILE,
    DTYPES,
    VAE_FILE,
    ReferenceFolder,
    export_reference_config,
    read_reference_folder,
    save_safetensors,
    write_reference_folder,
)
from voxcpm_train.convert.mapping import ConversionError, ours_to_reference, reference_to_ours

__all__ = [
    "ASSETS_DIR",
    "CONFIG_YAML",
    "single_process_megatron",
    "build_model",
    "load_into_model",
    "read_checkpoint_config",
    "import_folder",
    "export_checkpoint",
]

log = logging.getLogger(__name__)

ASSETS_DIR = "hf_assets"
CONFIG_YAML = "config.yaml"
_EXTRA_STATE = "_extra_state"


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A world of one process (gloo) with megatron's model parallel state at TP = PP = 1.

    Reuses what is already set up (it must then be TP = PP = 1); tears down only what it created.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from voxcpm_train.platform import init_single_process

    made_pg, made_mp = init_single_process()
    if dist.get_world_size() != 1:
        raise ConversionError(f"conversion runs in one process; torch.distributed has world size {dist.get_world_size()}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (1, 1):
        raise ConversionError(f"conversion needs TP = PP = 1, megatron is initialised with TP={tp}, PP={pp}")
    try:
        yield
    finally:
        if made_mp:
            parallel_state.destroy_model_parallel()
        if made_pg:
            dist.destroy_process_group()


def _single_stage(config):
    """``config`` for one pipeline stage in float32 with megatron's local layers (the stage cut, dtype,
    layer implementation and FP8 are the run's choice; both layer implementations store the same keys)."""
    return dataclasses.replace(config, pipeline_layers=None, params_dtype="float32", transformer_impl="local",
                               fp8=None)


def build_model(config):
    """The whole model (one stage, TP = 1), float32, on CPU, without random initialisation."""
    from voxcpm_train.model import VoxCPMModel

    return VoxCPMModel(_single_stage(config), pre_process=True, post_process=True, pp_rank=0, pp_size=1)


def load_into_model(model: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(sd)`` after checking every key and shape, with clear errors.

    megatron's ``_extra_state`` entries (None for local linears) are taken from the model itself.
    """
    own = model.state_dict()
    own_params = {k for k in own if not k.endswith(_EXTRA_STATE)}
    missing, unexpected = sorted(own_params - set(sd)), sorted(set(sd) - own_params)
    if missing or unexpected:
        raise ConversionError(
            "converted weights do not match the model's state dict:"
            + (f"\n  missing keys ({len(missing)}): " + ", ".join(missing) if missing else "")
            + (f"\n  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected) if unexpected else "")
        )
    bad = [
        f"{k}: converted {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own_params)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ConversionError("shape mismatch between converted weights and the model:\n  " + "\n  ".join(bad))
    full = {k: own[k] for k in own if k.endswith(_EXTRA_STATE)}
    full.update(sd)
    model.load_state_dict(full, strict=True)


def _config_to_yaml(config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml({"model": OmegaConf.structured(config)})


def read_checkpoint_config(ckpt_dir, override: Optional[str] = None):
    """The ``ModelConfig`` of a checkpoint: ``override`` (a preset name or YAML path), else the
    ``model`` section of ``<dir>/config.yaml`` (written by imports and by training)."""
    from omegaconf import OmegaConf

    from voxcpm_train.config.model import ModelConfig, load_model_preset, validate_model_config

    if override:
        return load_model_preset(override)
    path = Path(ckpt_dir) / CONFIG_YAML
    if not path.is_file():
        raise ConversionError(
            f"{ckpt_dir}: no {CONFIG_YAML} with the model config; pass --model-config PRESET_OR_YAML"
        )
    raw = OmegaConf.load(path)
    if "model" not in raw:
        raise ConversionError(f"{path}: no 'model' section")
    model_raw = raw.model
    if "defaults" in model_raw:
        model_raw.pop("defaults")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), model_raw))
    validate_model_config(cfg)
    return cfg


def import_folder(src, dst, model_config=None) -> Path:
    """Convert the reference folder ``src`` into a weights-only checkpoint at ``dst``.

    ``model_config`` defaults to the one ``config.json`` describes; a given one must describe the
    same weights (the strict load checks every shape).
    """
    from voxcpm_train.config.model import from_reference_config, validate_model_config
    from voxcpm_train.parallel.checkpoint import save_checkpoint

    src, dst = Path(src), Path(dst)
    folder = read_reference_folder(src)
    config = model_config if model_config is not None else from_reference_config(folder.config)
    validate_model_config(config)
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty")
    ours = reference_to_ours(folder.weights, config)
    folder.weights = None  # ours shares the unchanged tensors; drop the rest before building the model
    with single_process_megatron():
        model = build_model(config)
        load_into_model(model, ours)
        dst.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            dst,
            [model],
            extra_state={"converted_from": str(src.resolve()), "source_config": folder.config},
        )
    (dst / CONFIG_YAML).write_text(_config_to_yaml(config))
    _write_assets(folder, dst / ASSETS_DIR)
    return dst


def _write_assets(folder: ReferenceFolder, path: Path) -> None:
    """Everything of a reference folder but the model weights (config.json, AudioVAE, tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(folder.config, f, indent=2)
    if folder.audio_vae is not None:
        save_safetensors({k: v.contiguous() for k, v in folder.audio_vae.items()}, path / VAE_FILE,
                         metadata={"format": "pt"})
    else:
        log.warning("reference folder has no AudioVAE weights; an export will need --assets")
    import shutil

    for name, item in folder.assets.items():
        if item.is_dir():
            shutil.copytree(item, path / name, dirs_exist_ok=True)
        else:
            shutil.copyfile(item, path / name)


def _checkpoint_dtype(model_dir: Path) -> Optional[str]:
    """The dtype the checkpoint stores model weights in (None when mixed or unknown)."""
    from megatron.core import dist_checkpointing

    from voxcpm_train.parallel import safe_dcp_reading

    names = {v: k for k, v in DTYPES.items()}
    with safe_dcp_reading():
        meta = dist_checkpointing.load_tensors_metadata(str(model_dir))
    dtypes = {getattr(t, "dtype", None) for k, t in meta.items() if not k.startswith("optimizer")}
    dtypes.discard(None)
    return names.get(dtypes.pop()) if len(dtypes) == 1 else None


def _recorded_latents_vae(ckpt_dir: Path) -> Optional[dict]:
    """The AudioVAE a training checkpoint's latents were encoded with (None for an import)."""
    path = Path(ckpt_dir) / "extra_state.json"
    if not path.is_file():
        return None
    extra = json.loads(path.read_text()).get("extra") or {}
    return extra.get("latents_vae")


def export_checkpoint(src, dst, assets=None, dtype: Optional[str] = None, model_config=None,
                      lora: str = "merge") -> Path:
    """Write the reference folder ``dst`` from the checkpoint ``src`` (model weights only).

    ``assets``: a reference folder (or an import's ``hf_assets``) for config.json extras, the
    AudioVAE and tokenizer; default ``<src>/hf_assets``. Its AudioVAE must be the one the training
    latents were encoded with (recorded in a training checkpoint's extra_state.json), else
    ``ConversionError``. ``dtype``: of ``model.safetensors``;
    default the dtype the checkpoint stores. ``model_config`` overrides ``<src>/config.yaml``.
    ``lora`` (checkpoints of a LoRA run, see :mod:`voxcpm_train.convert.lora`): ``merge`` writes the
    adapters merged into the weights, ``adapter`` only the adapter folder the reference loads.
    """
    from voxcpm_train.convert import lora as lora_export
    from voxcpm_train.model.lora import merged_state_dict
    from voxcpm_train.parallel.checkpoint import load_checkpoint
    from voxcpm_train.training.vae_provenance import check_export_vae

    src, dst = Path(src), Path(dst)
    config = model_config if model_config is not None else read_checkpoint_config(src)
    if lora not in lora_export.LORA_EXPORTS:
        raise ConversionError(f"lora={lora!r} is not one of {lora_export.LORA_EXPORTS}")
    peft = lora_export.read_checkpoint_peft(src)
    if lora == "adapter":   # ships no AudioVAE: it is loaded onto the base folder, whose VAE is the import's
        if assets is not None:
            raise ConversionError("--assets does not apply to --lora adapter (the adapter folder holds only the "
                                  "adapters; it is loaded onto the base model folder)")
        if (src / ASSETS_DIR / VAE_FILE).is_file():
            check_export_vae(_recorded_latents_vae(src), src / ASSETS_DIR, src)
        return lora_export.export_adapter(src, dst, config, peft, dtype=dtype)
    assets_dir = Path(assets) if assets is not None else src / ASSETS_DIR
    if not (assets_dir / CONFIG_FILE).is_file():
        raise ConversionError(
            f"{assets_dir}: no reference assets (config.json, audiovae, tokenizer); "
            "pass --assets with the reference folder the run started from"
        )
    assets_folder = read_reference_folder(assets_dir, weights=False)
    check_export_vae(_recorded_latents_vae(src), assets_dir, src)
    if dtype is None:
        dtype = _checkpoint_dtype(src / "model") or "float32"
    with single_process_megatron():
        model = build_model(config)
        adapted = lora_export.add_checkpoint_adapters(model, peft)
        loaded = load_checkpoint(src, [model], optimizer=None, load_rng=False)
        if adapted:  # W + (alpha / r)·B@A
            lora_export.check_loaded(loaded, src)
        sd = merged_state_dict(model) if adapted else model.state_dict()
        ours = {k: v for k, v in sd.items() if not k.endswith(_EXTRA_STATE)}
    ref = ours_to_reference([[ours]], config)
    out = ReferenceFolder(
        config=export_reference_config(config, assets_folder.config),
        weights=ref,
        audio_vae=assets_folder.audio_vae,
        assets=assets_folder.assets,
    )
    return write_reference_folder(dst, out, dtype=dtype)
