"""`run.dir/hf_assets/`: what a reference model folder needs besides the model weights (config.json with the
AudioVAE config, audiovae.safetensors, tokenizer files). Every checkpoint links to it (`hf_assets`), so
`voxcpm-export run.dir/checkpoints/step_N DST` works on a training checkpoint directly."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("voxcpm_train")
ASSETS = "hf_assets"


def write_run_assets(job, run_dir: Path) -> Path:
    """Create run.dir/hf_assets once (rank 0). A run started from an import reuses the import's assets."""
    dst = Path(run_dir) / ASSETS
    if dst.exists():
        return dst
    if job.checkpoint.load and (Path(job.checkpoint.load) / ASSETS).is_dir():
        shutil.copytree(Path(job.checkpoint.load) / ASSETS, dst, symlinks=False)
        return dst
    from data_pipeline.audio_vae import AudioVAEConfig
    from data_pipeline.tokenizer import tokenizer_files

    from voxcpm_train.convert.folder import export_reference_config, save_safetensors

    tmp = dst.with_name(ASSETS + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    enc = job.data.encode
    vae_cfg = AudioVAEConfig.preset(enc.vae_config)
    if enc.vae_path:
        shutil.copyfile(enc.vae_path, tmp / "audiovae.safetensors")
    else:  # the seeded random init the latents were encoded with (demo)
        from voxcpm_train.training.evaluate import load_vae_decoder

        vae = load_vae_decoder(job)
        save_safetensors({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp / "audiovae.safetensors")
    config = export_reference_config(job.model, {"audio_vae_config": vae_cfg.to_dict()}, dtype="float32")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for item in tokenizer_files(job.data.tokenizer_path):   # a model folder as the tokenizer folder: only these
        shutil.copyfile(item, tmp / item.name)
    os.replace(tmp, dst)
    log.info(f"reference-folder assets (config.json, AudioVAE, tokenizer) -> {dst}")
    return dst


def link_assets(ckpt_dir: Path) -> None:
    """ckpt_dir/hf_assets -> ../../hf_assets (relative: the run dir may move)."""
    target = Path(ckpt_dir).parent.parent / ASSETS
    if target.is_dir() and not (Path(ckpt_dir) / ASSETS).exists():
        os.symlink(os.path.join("..", "..", ASSETS), Path(ckpt_dir) / ASSETS)
