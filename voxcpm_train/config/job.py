"""Root config of `voxcpm-train`: run/train keys plus one field per config group, and the start-up
(`build_job`): paths resolved against the working directory and checked, the model config taken from
the checkpoint training starts from, the AudioVAE checked end to end; every problem one `ConfigError`
naming the key."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING

from voxcpm_train.config.model import ConfigError, validate_model_config
from voxcpm_train.config.checkpoint import CheckpointConfig
from voxcpm_train.config.logging import LoggingConfig
from voxcpm_train.config.optim import OptimConfig
from voxcpm_train.config.parallel import ParallelConfig
from voxcpm_train.config.peft import PeftConfig
from voxcpm_train.config.platform import PlatformConfig
from voxcpm_train.config.stage import StageConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"        # everything of a run: config, checkpoints, metrics, samples
    name: Optional[str] = None       # wandb run name; None = basename of run.dir


@dataclass
class TrainConfig:
    max_steps: int = 100             # train until this global optimizer step (across stages)
    seed: int = 1234                 # weights, data order and flow-matching draws derive from it


def _model_type():
    try:
        from voxcpm_train.config.model import ModelConfig
        return ModelConfig
    except ImportError:  # pragma: no cover - the model package is built in parallel
        return Any


def _data_type():
    try:
        from data_pipeline.config import DataConfig
        return DataConfig
    except ImportError:  # pragma: no cover
        return Any


ModelT = _model_type()
DataT = _data_type()


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelT = MISSING          # configs/model/*.yaml (voxcpm_train.config.model.ModelConfig)
    data: DataT = field(default_factory=DataT)   # configs/data/*.yaml (data_pipeline.config.DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)   # configs/peft/*.yaml: LoRA, frozen modules


def register() -> None:
    """Store the root schema (`job_schema`, first in configs/config.yaml's defaults) and the data schema."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    try:
        from data_pipeline import config as data_config
    except ImportError:  # pragma: no cover
        return
    if hasattr(data_config, "register"):
        data_config.register()
    else:
        cs.store(group="data", name="data_schema", node=data_config.DataConfig)


def validate_job_config(cfg, check_model: bool = True) -> None:
    """Cross-key checks that types alone cannot express; raises ConfigError naming the key. `check_model`:
    also validate cfg.model (`build_job` does it once the model config of the checkpoint is in)."""
    from voxcpm_train.config.model import ConfigError, validate_model_config
    from voxcpm_train.config.optim import PRECISION_CHOICES
    from voxcpm_train.config.parallel import RECOMPUTE_CHOICES, RECOMPUTE_LOCAL_CHOICES
    from voxcpm_train.config.platform import PLATFORM_CHOICES
    from voxcpm_train.config.logging import WANDB_MODES
    from voxcpm_train.config.stage import WSD_DECAY_STYLES

    def check(ok, msg):
        if not ok:
            raise ConfigError(msg)

    p = cfg.parallel
    for key in ("tp", "pp", "micro_batch_size", "global_batch_size"):
        check(getattr(p, key) >= 1, f"parallel.{key}={getattr(p, key)} must be >= 1")
    check(p.dp is None or p.dp >= 1, f"parallel.dp={p.dp} must be >= 1 or null")
    check(p.recompute in RECOMPUTE_CHOICES, f"parallel.recompute={p.recompute!r} must be one of {RECOMPUTE_CHOICES}")
    check(p.recompute_local in RECOMPUTE_LOCAL_CHOICES,
          f"parallel.recompute_local={p.recompute_local!r} must be one of {RECOMPUTE_LOCAL_CHOICES}")
    check(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1")
    check(cfg.optim.precision in PRECISION_CHOICES,
          f"optim.precision={cfg.optim.precision!r} must be one of {PRECISION_CHOICES}")
    check(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0")
    for k, v in cfg.optim.lr_mult.items():
        check(v > 0, f"optim.lr_mult.{k}={v} must be > 0")
    check(cfg.platform.device in PLATFORM_CHOICES,
          f"platform.device={cfg.platform.device!r} must be one of {PLATFORM_CHOICES}")
    check(cfg.logging.wandb_mode in WANDB_MODES,
          f"logging.wandb_mode={cfg.logging.wandb_mode!r} must be one of {WANDB_MODES}")
    s = cfg.stage
    check(s.lr_wsd_decay_style in WSD_DECAY_STYLES,
          f"stage.lr_wsd_decay_style={s.lr_wsd_decay_style!r} must be one of {WSD_DECAY_STYLES}")
    check(s.global_batch_mult >= 1, f"stage.global_batch_mult={s.global_batch_mult} must be >= 1")
    check(s.lr_warmup_steps >= 0, f"stage.lr_warmup_steps={s.lr_warmup_steps} must be >= 0")
    check(s.decay_steps >= -1, f"stage.decay_steps={s.decay_steps} must be >= 0 (or -1 = whole stage)")
    check(cfg.train.max_steps >= 1, f"train.max_steps={cfg.train.max_steps} must be >= 1")
    check(cfg.checkpoint.every >= 0, f"checkpoint.every={cfg.checkpoint.every} must be >= 0")
    check(cfg.checkpoint.keep_last >= 0, f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 0")
    check(bool(cfg.run.dir), "run.dir must be set")
    if check_model:
        validate_model_config(cfg.model, "model")
    from voxcpm_train.config.peft import validate_peft_config

    validate_peft_config(cfg.peft)
    check(getattr(cfg.data, "validation_path", None) is None or cfg.logging.val_every > 0,
          "data.validation_path is set but logging.val_every=0 (validation off)")


# --------------------------------------------------------------------------------------------- #
# Start-up: paths, model config from the checkpoint, AudioVAE provenance
# --------------------------------------------------------------------------------------------- #

log = logging.getLogger("voxcpm_train")


def _datasets(job) -> list:
    return list(job.data.datasets)


def _get(obj, name):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _set(obj, name, value):
    if isinstance(obj, dict):
        obj[name] = value
    else:
        setattr(obj, name, value)


def path_keys(job) -> list:
    """(key, owner, attribute) of every filesystem path of the job config."""
    keys = [("run.dir", job.run, "dir"), ("data.tokenizer_path", job.data, "tokenizer_path"),
            ("checkpoint.load", job.checkpoint, "load")]
    keys += [(f"data.datasets.{i}.path", d, "path") for i, d in enumerate(_datasets(job))]
    keys += [("data.validation_path", job.data, "validation_path"),
             ("data.encode.vae_path", job.data.encode, "vae_path")]
    return [k for k in keys if isinstance(k[1], dict) or hasattr(k[1], k[2])]


def resolve_paths(job, cwd) -> dict:
    """Make every relative path of `job` absolute against `cwd` (in place, `~` expanded); returns
    key -> the value as given, for error messages."""
    given = {}
    for key, owner, attr in path_keys(job):
        value = _get(owner, attr)
        if value is None or value == "":
            continue
        given[key] = str(value)
        _set(owner, attr, os.path.abspath(os.path.join(cwd, os.path.expanduser(str(value)))))   # links kept
    return given


def _encode_hint(path: Path) -> str:
    return f"encode it first: voxcpm-data encode {path} --output <latent folder> --vae <model>/audiovae.safetensors"


def check_paths(job, given: dict, resuming: bool) -> None:
    """Every input path exists and is what its key needs: one `ConfigError` naming the key, the value as
    given and the resolved path. `given`: key -> value before `resolve_paths`."""
    from voxcpm_train.parallel.checkpoint import is_complete_checkpoint

    def fail(key, value, why):
        shown = given.get(key, str(value))
        resolved = f" (-> {value})" if shown != str(value) else ""
        raise ConfigError(f"{key}={shown}{resolved}: {why}")

    load = job.checkpoint.load
    if load and not resuming:
        if not Path(load).is_dir():
            fail("checkpoint.load", load, "no such directory (a voxcpm-import output or a training checkpoint)")
        if not is_complete_checkpoint(load):
            fail("checkpoint.load", load, "is not a complete checkpoint (no model/ and extra_state.json); "
                 "a reference model folder is converted with `voxcpm-import <folder> <checkpoint dir>`")
    tok = Path(job.data.tokenizer_path)
    if not tok.is_dir():
        fail("data.tokenizer_path", tok, "no such directory (the tokenizer files of the model folder)")
    if not any((tok / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        fail("data.tokenizer_path", tok, "holds no tokenizer.json / tokenizer_config.json")
    latent_keys = [(f"data.datasets.{i}.path", _get(d, "path")) for i, d in enumerate(_datasets(job))]
    if job.data.validation_path:
        latent_keys.append(("data.validation_path", job.data.validation_path))
    for key, value in latent_keys:
        if value is None:
            raise ConfigError(f"{key} is not set: the latent folder written by `voxcpm-data encode`")
        p = Path(value)
        if not p.exists():
            fail(key, p, "does not exist (a latent folder written by `voxcpm-data encode`)")
        if p.is_file():
            what = "a JSONL manifest" if p.suffix == ".jsonl" else "a file"
            fail(key, p, f"is {what}, not a latent folder: {_encode_hint(p)}")
        if not (p / "meta.json").is_file():
            raw = any(q.suffix in (".tar", ".jsonl", ".wav", ".flac", ".mp3", ".ogg") for q in p.iterdir())
            fail(key, p, "has no meta.json, not a latent folder" + (f": {_encode_hint(p)}" if raw else
                                                                   " (written by `voxcpm-data encode`)"))
    vae = job.data.encode.vae_path
    if vae:
        if not Path(vae).is_file():
            fail("data.encode.vae_path", vae, "no such file (audiovae.safetensors of the model folder)")
        if not str(vae).endswith(".safetensors"):
            fail("data.encode.vae_path", vae, "not a .safetensors file (pickles are not loaded)")


# keys of the model config that do not shape the weights: how this run computes (the composed config
# - preset, experiment, command line - wins over the checkpoint's)
MODEL_RUN_KEYS = ("attention_backend", "params_dtype", "init_method_std", "pipeline_layers",
                  "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_local_granularity",
                  "transformer_impl", "packed_seq_format", "fp8", "fp8_recipe", "fp8_amax_history_len")
# training-recipe keys stored in a checkpoint: the checkpoint's unless given on the command line
MODEL_RECIPE_KEYS = ("flow", "lambda_diff", "lambda_stop", "max_length")


def _flat(cfg, prefix="model") -> dict:
    from omegaconf import OmegaConf

    def walk(node, key, out):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}", out)
        else:
            out[key] = node
        return out

    return walk(OmegaConf.to_container(OmegaConf.structured(cfg)), prefix, {})


def _is_weight_key(key: str) -> bool:
    top = key.split(".")[1] if "." in key else ""
    return top not in MODEL_RUN_KEYS and top not in MODEL_RECIPE_KEYS


def model_overrides(cli: Sequence[str]) -> tuple[list, Optional[str]]:
    """(model.* keys set on the command line, a model preset chosen there) from Hydra's task overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys, preset = [], None
    for ov in OverridesParser.create().parse_overrides(list(cli)):
        k = ov.key_or_group
        if k == "model" and not ov.is_delete():
            preset = str(ov.value())
        elif k.startswith("model."):
            keys.append(k)
    return keys, preset


def model_from_checkpoint(job, ckpt: Path, label: str, cli: Sequence[str]):
    """The model config of a run starting from (or resuming) `ckpt`: the checkpoint's, with the run keys
    (MODEL_RUN_KEYS) of the composed config and the recipe keys given on the command line. A command-line
    key (or preset) contradicting a weight-shaping value of the checkpoint is a `ConfigError`. `label`
    names the checkpoint in messages (e.g. `checkpoint.load=/ckpt/voxcpm2`)."""
    from omegaconf import OmegaConf

    from voxcpm_train.convert.checkpoint import CONFIG_YAML, read_checkpoint_config
    from voxcpm_train.convert.mapping import ConversionError
    from voxcpm_train.platform import dist_env   # rank 0 logs (torchrun or srun), before the process group

    if not (ckpt / CONFIG_YAML).is_file():
        log.warning(f"{label} has no {CONFIG_YAML}: the model config is the composed one (model preset)")
        return job.model
    try:
        saved = read_checkpoint_config(ckpt)
    except (ConversionError, ConfigError, ValueError) as err:
        raise ConfigError(f"{label}: its {CONFIG_YAML} has no valid model config ({err})") from None
    have, want = _flat(saved), _flat(job.model)
    new_model = (", or start a new model in a new run.dir" if label.startswith("the resumed")
                 else ", or set checkpoint.load=null to start a new model")
    keys, preset = model_overrides(cli)
    for key in keys:
        for leaf in [k for k in want if k == key or k.startswith(key + ".")]:
            if _is_weight_key(leaf) and want[leaf] != have.get(leaf):
                raise ConfigError(f"{leaf}={want[leaf]} but {label} has {have.get(leaf)} (the model config "
                                  f"comes from the checkpoint: drop the override{new_model})")
    if preset is not None:
        for leaf in want:
            if _is_weight_key(leaf) and want[leaf] != have.get(leaf):
                raise ConfigError(f"model={preset} sets {leaf}={want[leaf]} but {label} has {have.get(leaf)} "
                                  f"(the model config comes from the checkpoint: drop model={preset})")
    differ = [k for k in want if _is_weight_key(k) and want[k] != have.get(k)]
    if differ and dist_env().rank == 0:
        log.info(f"model config from {label}; the composed model preset differs in {differ[:6]}"
                 f"{' ...' if len(differ) > 6 else ''} (not used)")
    node, composed = OmegaConf.structured(saved), OmegaConf.structured(job.model)
    for key in [f"model.{k}" for k in MODEL_RUN_KEYS] + [k for k in keys if not _is_weight_key(k)]:
        sub = key[len("model."):]
        OmegaConf.update(node, sub, OmegaConf.select(composed, sub), merge=False)
    return OmegaConf.to_object(node)


def _original_cwd() -> str:
    try:
        from hydra.utils import get_original_cwd

        return get_original_cwd()
    except (ImportError, ValueError):
        return os.getcwd()


def _dotted(key: str) -> str:
    """`data.datasets[0].path` -> `data.datasets.0.path` (the command-line spelling)."""
    return key.replace("[", ".").replace("]", "")


def _raw_values(cfg) -> dict:
    """key -> the value as written (interpolations unresolved) of the path keys."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False)
    out = {}
    for key in ("run.dir", "data.tokenizer_path", "checkpoint.load", "data.validation_path", "data.encode.vae_path"):
        node = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    for i, d in enumerate((raw.get("data") or {}).get("datasets") or []):
        if isinstance(d, dict):
            out[f"data.datasets.{i}.path"] = d.get("path")
    return out


def build_job(cfg, cli_overrides: Sequence[str] = (), cwd=None, check_vae: bool = True):
    """The JobConfig of a composed Hydra config `cfg`, ready to train: typed, validated, paths absolute
    and checked, model config from the checkpoint it starts from, AudioVAE checked. `cli_overrides`:
    Hydra's task overrides (to tell the user's model keys from the preset's). Raises `ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from voxcpm_train.training.checkpoint import find_latest

    missing = [_dotted(k) for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra")]
    if missing:
        raise ConfigError(f"{missing[0]} is not set (required: give it on the command line, {missing[0]}=...)"
                          + (f"; also unset: {', '.join(missing[1:])}" if missing[1:] else ""))
    try:
        job = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:   # pragma: no cover - missing_keys found them above
        raise ConfigError(f"{_dotted(str(getattr(err, 'full_key', '')))} is not set") from None
    cwd = cwd or _original_cwd()
    given = resolve_paths(job, cwd)
    raw = _raw_values(cfg)
    for key, value in raw.items():       # e.g. data.tokenizer_path=${checkpoint.load}/hf_assets, load unset
        for ref in re.findall(r"\$\{([\w.]+)\}", str(value or "")):
            if OmegaConf.select(cfg, ref) is None:
                raise ConfigError(f"{ref} is not set, and {key}={value} follows it: set {ref}=... (or {key}=...)")
    given = {k: (f"{raw[k]} = {v}" if "${" in str(raw.get(k, "")) else v) for k, v in given.items()}
    validate_job_config(job, check_model=False)
    resume = find_latest(Path(job.run.dir) / "checkpoints") if job.checkpoint.resume else None
    check_paths(job, given, resuming=resume is not None)
    if resume is not None:              # the model config of the checkpoint training continues from
        job.model = model_from_checkpoint(job, resume, f"the resumed checkpoint {resume}", cli_overrides)
    elif job.checkpoint.load:
        job.model = model_from_checkpoint(job, Path(job.checkpoint.load),
                                          f"checkpoint.load={given['checkpoint.load']}", cli_overrides)
    validate_model_config(job.model, "model")
    if check_vae:
        from voxcpm_train.training.vae_provenance import check_job_vae

        check_job_vae(job, given)
    return job
