"""LoRA checkpoints -> what the reference `voxcpm` package loads: merged weights or an adapter folder.

A training checkpoint of a `peft.method=lora` run holds the base weights and the adapters
(`<linear>.lora_A` / `.lora_B`, see :mod:`voxcpm_train.model.lora`); its `config.yaml` holds the
`peft` section. Two exports:

* merged (`voxcpm-export SRC DST`, default): an ordinary reference folder whose weights are
  `W + (alpha / r)·B@A` (fp32 arithmetic); loads anywhere the base model loads.
* adapter (`voxcpm-export SRC DST --lora adapter`): `DST/lora_weights.safetensors` with the
  reference's names and `DST/lora_config.json` with the fields of the reference `LoRAConfig`:

      from voxcpm import VoxCPM
      from voxcpm.model.voxcpm2 import LoRAConfig
      model = VoxCPM(BASE_FOLDER, lora_config=LoRAConfig(**json.load(open(DST / "lora_config.json"))),
                     lora_weights_path=DST)

  (with the default `configs/peft/lora.yaml` the reference's own default LoRAConfig matches, so
  `lora_weights_path=DST` alone works). BASE_FOLDER is the model the run started from
  (`checkpoint.load`, an import of it). Only tensors are written (safetensors); the reference reads the
  file with safetensors too.

Name mapping (per layer of `base_lm`, `residual_lm`, `feat_decoder.estimator.decoder`): `linear_qkv`
-> `self_attn.{q,k,v}_proj` (A shared by the three, B split by megatron's per-query-group rows),
`linear_proj` -> `self_attn.o_proj`, `linear_fc1` -> `mlp.{gate,up}_proj` (A shared, B = [gate; up]),
`linear_fc2` -> `mlp.down_proj`; projections keep their names. The reference applies one LoRAConfig:
one rank and an integer alpha everywhere, one target list for both LMs (`target_modules_lm`); linears
of that list without a tensor in the file keep B = 0 there, i.e. contribute nothing, so any of our
target choices is expressed exactly as long as the rank and alpha are uniform.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from voxcpm_train.config.peft import LORA_STACKS, PeftConfig
from voxcpm_train.convert.mapping import ConversionError, _unfuse, entries

__all__ = [
    "ADAPTER_FILE",
    "ADAPTER_CONFIG_FILE",
    "LORA_EXPORTS",
    "read_checkpoint_peft",
    "add_checkpoint_adapters",
    "check_loaded",
    "reference_adapters",
    "reference_lora_config",
    "write_adapter_folder",
    "export_adapter",
]

ADAPTER_FILE = "lora_weights.safetensors"
ADAPTER_CONFIG_FILE = "lora_config.json"
ADAPTER_INFO_FILE = "lora_info.json"
LORA_EXPORTS = ("merge", "adapter")

# our layer linear -> the reference's linears (in the mapping table's part order)
_REFERENCE_LINEARS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}


def read_checkpoint_peft(ckpt_dir) -> PeftConfig:
    """The `peft` section of `<ckpt>/config.yaml` (training checkpoints), or no peft (imports)."""
    from omegaconf import OmegaConf

    from voxcpm_train.config.peft import validate_peft_config
    from voxcpm_train.convert.checkpoint import CONFIG_YAML

    path = Path(ckpt_dir) / CONFIG_YAML
    raw = OmegaConf.load(path) if path.is_file() else {}
    if "peft" not in raw:
        return PeftConfig()
    try:
        peft = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PeftConfig), raw["peft"]))
        validate_peft_config(peft)
    except Exception as err:  # omegaconf / the validation name the key
        raise ConversionError(f"{path}: peft section: {err}") from err
    return peft


def add_checkpoint_adapters(model: torch.nn.Module, peft: PeftConfig) -> bool:
    """Give the (TP = 1) export model the adapters of a LoRA run; False without LoRA."""
    from voxcpm_train.model.lora import apply_peft

    if not peft.uses_lora:
        return False
    apply_peft(model, PeftConfig(method="lora", lora=peft.lora))  # freezing is irrelevant to an export
    return True


def check_loaded(result, src) -> None:
    """A LoRA run's checkpoint must hold the adapters it was configured with."""
    if result.missing_optional:
        raise ConversionError(
            f"{src}: the checkpoint's config.yaml has peft.method=lora but it holds no adapter tensors "
            f"(e.g. {result.missing_optional[0]}); is it the run's own checkpoint?"
        )


def reference_adapters(model: torch.nn.Module, config) -> Dict[str, torch.Tensor]:
    """The adapters of a TP = 1, one-stage model under the reference's names (`...q_proj.lora_A`)."""
    from voxcpm_train.model.lora import lora_modules

    by_weight = {e.ours: e for e in entries(config)}
    out: Dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model):
        entry = by_weight.get(f"{name}.weight")
        if entry is None:
            raise ConversionError(f"LoRA on {name}: not a weight the reference model has")
        a, b = module.lora_A.detach(), module.lora_B.detach()
        groups = entry.stack.num_query_groups if entry.stack is not None else 0
        b_parts = _unfuse(entry, b, groups)
        for ref_weight, b_part in zip(entry.ref, b_parts):
            stem = ref_weight[: -len(".weight")]
            out[f"{stem}.lora_A"] = a.clone()
            out[f"{stem}.lora_B"] = b_part.contiguous()
    return out


def reference_lora_config(peft: PeftConfig) -> Tuple[dict, bool]:
    """(fields of the reference `LoRAConfig` that reproduce `peft.lora`, whether the reference's default
    LoRAConfig is the same). Raises ConversionError where the reference cannot express it."""
    lora = peft.lora
    groups = {g: getattr(lora, g) for g in LORA_STACKS}
    used = [g for g, names in groups.items() if names] + (["projections"] if lora.projections else [])
    ranks = {g: lora.group_rank(g) for g in used}
    if len(set(ranks.values())) > 1:
        raise ConversionError(f"the reference LoRAConfig has one rank for all adapters; this run has {ranks} "
                              "(peft.lora.ranks): export merged weights instead (--lora merge)")
    if float(lora.alpha) != int(lora.alpha):
        raise ConversionError(f"the reference LoRAConfig takes an integer alpha; peft.lora.alpha={lora.alpha}: "
                              "export merged weights instead (--lora merge)")
    lm = sorted({ref for g in ("base_lm", "residual_lm") for n in groups[g] for ref in _REFERENCE_LINEARS[n]})
    dit = sorted({ref for n in groups["feat_decoder"] for ref in _REFERENCE_LINEARS[n]})
    fields = {
        "enable_lm": bool(lm),
        "enable_dit": bool(dit),
        "enable_proj": bool(lora.projections),
        "r": next(iter(ranks.values())) if ranks else int(lora.rank),
        "alpha": int(lora.alpha),
        "dropout": float(lora.dropout),
        "target_modules_lm": lm or ["q_proj", "v_proj", "k_proj", "o_proj"],
        "target_modules_dit": dit or ["q_proj", "v_proj", "k_proj", "o_proj"],
        "target_proj_modules": list(lora.projections) or ["enc_to_lm_proj", "lm_to_dit_proj", "res_to_dit_proj",
                                                          "fusion_concat_proj"],
    }
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    default = (fields["enable_lm"] and fields["enable_dit"] and not fields["enable_proj"] and fields["r"] == 8
               and fields["alpha"] == 16 and set(lm) <= attention and set(dit) <= attention)
    return fields, default


def write_adapter_folder(dst, tensors: Dict[str, torch.Tensor], lora_config: dict, info: dict,
                         dtype: Optional[str] = None) -> Path:
    """`dst/lora_weights.safetensors` (+ lora_config.json, lora_info.json), in the usual file mode (0644)."""
    from voxcpm_train.convert.folder import DTYPES, save_safetensors

    dst = Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: (v.to(DTYPES[dtype]) if dtype else v).detach().cpu().contiguous() for k, v in tensors.items()},
                     dst / ADAPTER_FILE, metadata={"format": "pt"})
    for name, obj in ((ADAPTER_CONFIG_FILE, lora_config), (ADAPTER_INFO_FILE, info)):
        (dst / name).write_text(json.dumps(obj, indent=2) + "\n")
    return dst


def _base_of_run(src: Path) -> Optional[str]:
    from omegaconf import OmegaConf

    from voxcpm_train.convert.checkpoint import CONFIG_YAML

    path = src / CONFIG_YAML
    if not path.is_file():
        return None
    raw = OmegaConf.load(path)
    return OmegaConf.select(raw, "checkpoint.load", default=None)


def export_adapter(src, dst, config, peft: PeftConfig, dtype: Optional[str] = None) -> Path:
    """Write the adapter folder of the LoRA checkpoint `src` (model config `config`) at `dst`."""
    from voxcpm_train.convert.checkpoint import _checkpoint_dtype, build_model, single_process_megatron
    from voxcpm_train.parallel.checkpoint import load_checkpoint

    src = Path(src)
    if not peft.uses_lora:
        raise ConversionError(f"{src}: not a LoRA checkpoint (its config.yaml has no peft.method=lora): "
                              "export without --lora adapter")
    if peft.lora.train_base:
        raise ConversionError(f"{src}: peft.lora.train_base=true, the base weights were trained too: the "
                              "adapters alone do not reproduce the model; export merged weights (--lora merge)")
    fields, default = reference_lora_config(peft)
    if dtype is None:
        dtype = _checkpoint_dtype(src / "model") or "float32"
    with single_process_megatron():
        model = build_model(config)
        add_checkpoint_adapters(model, peft)
        check_loaded(load_checkpoint(src, [model], optimizer=None, load_rng=False), src)
        tensors = reference_adapters(model, config)
    info = {
        "source_checkpoint": str(src.resolve()),
        "base_checkpoint": _base_of_run(src),
        "frozen_base": True,
        "reference_default_lora_config": default,
        "peft_lora": {k: getattr(peft.lora, k) for k in ("rank", "alpha", "dropout", "base_lm", "residual_lm",
                                                          "feat_decoder", "projections")},
    }
    return write_adapter_folder(dst, tensors, fields, info, dtype=dtype)
