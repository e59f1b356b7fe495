"""One AudioVAE end to end: the one the latents were encoded with (`meta.json["vae"]` of every latent
folder, written by `voxcpm-data encode`), the one training decodes its audio samples with
(`data.encode.vae_path`; null = the seeded random init the latents record) and the one an export ships
(`hf_assets/audiovae.safetensors` of the checkpoint: an import's, or the run's own). A model trained on
the latents of one VAE and shipped with another produces noise, so a mismatch is an error; latents of a
random-init VAE (no `--vae` at encode) are a loud warning unless `data.encode.allow_random_init` (demo).

A VAE *identity* is the dict `meta.json` records:

    {"weights": "random_init", "seed": 0, "config": {...AudioVAEConfig...}}
    {"weights": "/models/VoxCPM2/audiovae.safetensors", "fingerprint": "1a2b...", "config": {...}}

`fingerprint` (`data_pipeline.audio_vae.state_fingerprint`) hashes the tensors, so a file and any
re-saved copy of it (an import's hf_assets) agree; latent folders written before fingerprints were
recorded are fingerprinted from their recorded file when it still exists.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Optional

from voxcpm_train.config.model import ConfigError
from voxcpm_train.convert.folder import VAE_FILE
from voxcpm_train.platform import dist_env      # rank 0 warns (torchrun or srun), before the process group

log = logging.getLogger("voxcpm_train")

RANDOM = "random_init"      # meta.json "weights" of a seeded random init (encode without --vae)


def _dataset_paths(job) -> list[tuple[str, str]]:
    """(config key, latent folder) of every training dataset and the validation set."""
    out = []
    for i, d in enumerate(job.data.datasets):
        out.append((f"data.datasets.{i}.path", d["path"] if isinstance(d, dict) else d.path))
    if getattr(job.data, "validation_path", None):
        out.append(("data.validation_path", job.data.validation_path))
    return out


def preset_name(config: dict) -> Optional[str]:
    """The `AudioVAEConfig.preset` name (full | small | tiny) of a config dict, None if none matches."""
    from data_pipeline.audio_vae import AudioVAEConfig

    for name in ("full", "small", "tiny"):
        if AudioVAEConfig.preset(name).to_dict() == json.loads(json.dumps(config)):
            return name
    return None


def describe(ident: dict) -> str:
    cfg = ident.get("config") or {}
    name = preset_name(cfg) if cfg else None
    size = f"config {name!r}" if name else "a custom config"
    if ident.get("weights") == RANDOM:
        return f"a random-init AudioVAE (seed {ident.get('seed', 0)}, {size})"
    fp = fingerprint(ident)
    return f"{ident.get('weights')} ({size}, fingerprint {fp or 'unknown: file not found'})"


@lru_cache(maxsize=16)
def _file_fingerprint(path: str, size: int, mtime: float) -> str:
    from safetensors.torch import load_file

    from data_pipeline.audio_vae import state_fingerprint

    return state_fingerprint(load_file(path))


def file_fingerprint(path) -> str:
    p = Path(path)
    st = p.stat()
    return _file_fingerprint(str(p.resolve()), st.st_size, st.st_mtime)


@lru_cache(maxsize=4)
def _random_fingerprint(seed: int, config_json: str) -> str:
    from data_pipeline.audio_vae import AudioVAEConfig, load_audio_vae, state_fingerprint

    vae, _ = load_audio_vae(None, AudioVAEConfig(**json.loads(config_json)), with_decoder=True, seed=seed)
    return state_fingerprint(vae.state_dict())


def fingerprint(ident: dict) -> Optional[str]:
    """The tensor hash of a VAE identity (a random init is built, with its decoder, to hash it); None
    when a file identity has no recorded fingerprint and its file is gone."""
    if ident.get("fingerprint"):
        return ident["fingerprint"]
    if ident.get("weights") == RANDOM:
        return _random_fingerprint(int(ident.get("seed", 0)), json.dumps(ident["config"], sort_keys=True))
    path = ident.get("weights")
    if path and Path(path).is_file():
        return file_fingerprint(path)
    return None


def file_identity(path, config: Optional[dict] = None) -> dict:
    return {"weights": str(path), "fingerprint": file_fingerprint(path), "config": config}


def same_vae(a: dict, b: dict) -> Optional[bool]:
    """Whether two identities are the same weights (None: cannot tell, a recorded file is gone)."""
    if a.get("weights") == RANDOM and b.get("weights") == RANDOM:
        return int(a.get("seed", 0)) == int(b.get("seed", 0)) and _norm(a.get("config")) == _norm(b.get("config"))
    fa, fb = fingerprint(a), fingerprint(b)
    if fa is None or fb is None:
        return None
    return fa == fb


def latents_vae(job, given: Optional[dict] = None) -> dict:
    """The identity recorded by every latent folder of the job (they must agree)."""
    given = given or {}
    first_key = None
    ident = None
    for key, path in _dataset_paths(job):
        meta_path = Path(path) / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"{key}={given.get(key, path)}: no meta.json (not a folder written by "
                              f"`voxcpm-data encode`)")
        vae = json.loads(meta_path.read_text()).get("vae")
        if not vae:
            raise ConfigError(f"{key}={given.get(key, path)}: meta.json records no AudioVAE (\"vae\"); re-encode it")
        if ident is None:
            first_key, ident = key, vae
        elif not _same_recorded(ident, vae):
            raise ConfigError(f"{key}={given.get(key, path)} was encoded with {describe(vae)}, but {first_key} with "
                              f"{describe(ident)}: the latents of one run must come from one AudioVAE")
    return ident


def _norm(config) -> Optional[dict]:
    return json.loads(json.dumps(config, sort_keys=True)) if config is not None else None


def _same_recorded(a: dict, b: dict) -> bool:
    same = same_vae(a, b)
    if same is None:       # two old folders naming a file that is gone: the same name counts
        return a.get("weights") == b.get("weights") and _norm(a.get("config")) == _norm(b.get("config"))
    return same and _norm(a.get("config")) == _norm(b.get("config"))


def sample_vae(job, latents: dict) -> dict:
    """The identity of the VAE training decodes samples with (`data.encode`)."""
    from data_pipeline.audio_vae import AudioVAEConfig

    enc = job.data.encode
    try:
        config = AudioVAEConfig.preset(enc.vae_config).to_dict()
    except ValueError as err:
        raise ConfigError(f"data.encode.vae_config={enc.vae_config!r}: {err}") from None
    if enc.vae_path:
        return file_identity(enc.vae_path, config)
    seed = int(latents.get("seed", 0)) if latents.get("weights") == RANDOM else 0
    return {"weights": RANDOM, "seed": seed, "config": config}


def loud_warning(lines: list[str]) -> None:
    """A framed WARNING (once per job: the process of RANK 0; start-up runs before torch.distributed)."""
    if dist_env().rank != 0:
        return
    bar = "!" * 100
    log.warning("\n".join([bar, *[f"!!  {l}" for l in lines], bar]))


def check_job_vae(job, given: Optional[dict] = None) -> dict:
    """Compare the latents' VAE with the samples' and the export's; raise `ConfigError` naming the key on
    a mismatch, warn loudly about random-init latents. Returns the latents' identity (recorded in every
    checkpoint for `voxcpm-export`). `given`: key -> the value as the user wrote it (for messages)."""
    given = given or {}
    latents = latents_vae(job, given)
    key0, path0 = _dataset_paths(job)[0]
    where = (key0, given.get(key0, path0))
    enc = job.data.encode
    vae_path = given.get("data.encode.vae_path", enc.vae_path)
    samples = sample_vae(job, latents)
    if _norm(latents.get("config")) != _norm(samples["config"]):
        name = preset_name(latents.get("config") or {})
        hint = f"data.encode.vae_config={name}" if name else "a data.encode.vae_config preset that matches"
        raise ConfigError(f"data.encode.vae_config={enc.vae_config} but {where[0]}={where[1]} was encoded with "
                          f"{describe(latents)}: set {hint}")
    for key, assets in _export_assets(job, given):
        vae_file = assets / VAE_FILE
        exported = mismatching_assets_vae(latents, assets)
        if exported is not None:
            raise ConfigError(
                f"{key}: its AudioVAE {vae_file} (what voxcpm-export ships with the model, fingerprint "
                f"{exported['fingerprint']}) is not the one {where[0]}={where[1]} was encoded with "
                f"({describe(latents)}): re-encode the data with `voxcpm-data encode ... --vae {vae_file}`")
    same = same_vae(latents, samples)
    if same is False:
        if enc.vae_path:
            fix = (f"data.encode.vae_path=null" if latents.get("weights") == RANDOM
                   else f"data.encode.vae_path={latents.get('weights')}")
            raise ConfigError(f"data.encode.vae_path={vae_path} (fingerprint {samples['fingerprint']}) is not "
                              f"the AudioVAE {where[0]}={where[1]} was encoded with ({describe(latents)}): set "
                              f"{fix} (or re-encode)")
        raise ConfigError(f"data.encode.vae_path=null means {describe(samples)}, but {where[0]}={where[1]} was "
                          f"encoded with {describe(latents)}: set data.encode.vae_path={latents.get('weights')}")
    if same is None and dist_env().rank == 0:
        log.warning(f"{where[0]}={where[1]} names the AudioVAE {latents.get('weights')}, which does not exist "
                    f"here: cannot check that data.encode.vae_path={vae_path} is the same VAE")
    if latents.get("weights") == RANDOM and not enc.allow_random_init:
        loud_warning([
            f"{where[0]}={where[1]} holds latents of a RANDOM-INIT AudioVAE (seed {latents.get('seed', 0)}):",
            "it was encoded without --vae. A model trained on them only works with that random codec;",
            "no released VoxCPM AudioVAE can decode what it generates. Re-encode with",
            "`voxcpm-data encode ... --vae <model folder>/audiovae.safetensors --config full`",
            "(or set data.encode.allow_random_init=true if this is intended, e.g. a CPU demo).",
        ])
    return latents


def _export_assets(job, given: dict) -> list[tuple[str, Path]]:
    """Where the exported AudioVAE will come from: the run's hf_assets (resume) or checkpoint.load's."""
    out = []
    run_assets = Path(job.run.dir) / "hf_assets"
    if run_assets.is_dir():
        out.append((f"run.dir={given.get('run.dir', job.run.dir)} (hf_assets)", run_assets))
    elif job.checkpoint.load and (Path(job.checkpoint.load) / "hf_assets").is_dir():
        out.append((f"checkpoint.load={given.get('checkpoint.load', job.checkpoint.load)}",
                    Path(job.checkpoint.load) / "hf_assets"))
    return out


def mismatching_assets_vae(latents: dict, assets_dir) -> Optional[dict]:
    """The identity of `assets_dir`'s audiovae.safetensors when it is known to differ from the VAE of the
    latents (`latents`), else None (the same, unknown, or a .pth AudioVAE, which is not fingerprinted)."""
    vae_file = Path(assets_dir) / VAE_FILE
    if not vae_file.is_file():
        return None
    exported = file_identity(vae_file)
    return exported if same_vae(latents, exported) is False else None


def check_export_vae(recorded: Optional[dict], assets_dir, src) -> None:
    """`voxcpm-export`: the AudioVAE of `assets_dir` must be the one the checkpoint's training latents
    were encoded with (`recorded`, from its extra_state.json; None = an import, nothing to compare)."""
    from voxcpm_train.convert.mapping import ConversionError

    if not recorded:
        return
    vae_file = Path(assets_dir) / VAE_FILE
    exported = mismatching_assets_vae(recorded, assets_dir)
    if exported is not None:
        raise ConversionError(
            f"{vae_file} (fingerprint {exported['fingerprint']}) is not the AudioVAE the training latents of "
            f"{src} were encoded with ({describe(recorded)}); the exported model would decode to noise. "
            f"Pass --assets with the folder holding that AudioVAE")
    if recorded.get("weights") == RANDOM and not recorded.get("allow_random_init"):
        loud_warning([
            f"{src} was trained on latents of a RANDOM-INIT AudioVAE (seed {recorded.get('seed', 0)}):",
            "the export ships that random codec; it is only good for demos and tests.",
        ])
