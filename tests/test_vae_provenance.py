"""One AudioVAE end to end: latents encoded (for real, `data_pipeline.encode.run_encode`) with one VAE and
trained with another for the samples, or exported with another, are errors naming the key; random-init
latents are a loud warning unless `data.encode.allow_random_init`."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from test_finetune import write_manifest
from test_train_utils import REPO

TOKENIZER = str(REPO / "demo_data/tokenizer")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two clips encoded three times with the tiny AudioVAE: random init seed 1, random init seed 2, and
    the file `vae_a.safetensors` (random init seed 7, saved); plus that VAE's file re-saved as a copy."""
    from safetensors.torch import load_file, save_file

    from data_pipeline.audio_vae import AudioVAEConfig, load_audio_vae
    from data_pipeline.encode import EncodeOptions, run_encode

    root = tmp_path_factory.mktemp("vae")
    manifest = write_manifest(root, "clips", slice(0, 2))
    vae, _ = load_audio_vae(None, AudioVAEConfig.preset("tiny"), with_decoder=True, seed=7)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / "vae_a.safetensors"))
    (root / "copy").mkdir()
    save_file({k: v.clone() for k, v in sorted(load_file(str(root / "vae_a.safetensors")).items(), reverse=True)},
              str(root / "copy/audiovae.safetensors"), metadata={"format": "pt"})     # other bytes, same tensors
    for out, vae_path, seed in (("seed1", None, 1), ("seed2", None, 2), ("file_a", str(root / "vae_a.safetensors"), 0)):
        run_encode([str(manifest)], str(root / out), EncodeOptions(vae_config="tiny", vae_path=vae_path, seed=seed,
                                                                   device="cpu"), rank=0, world_size=1)
    return root


def _job(root: Path, latents: str, *overrides):
    from hydra import compose, initialize_config_dir

    from voxcpm_train.config import register_configs
    from voxcpm_train.config.job import build_job

    register_configs()
    ov = ["experiment=demo", f"data.tokenizer_path={TOKENIZER}", f"data.datasets.0.path={latents}",
          "data.encode.vae_config=tiny", "data.encode.allow_random_init=false", f"run.dir={root}/run", *overrides]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("config", overrides=ov)
    return build_job(cfg, ov, cwd=root)


def test_samples_with_the_vae_of_another_seed_is_an_error(corpus):
    from voxcpm_train.config.model import ConfigError

    from safetensors.torch import save_file
    from data_pipeline.audio_vae import AudioVAEConfig, load_audio_vae

    vae2, _ = load_audio_vae(None, AudioVAEConfig.preset("tiny"), with_decoder=True, seed=2)
    save_file({k: v.contiguous() for k, v in vae2.state_dict().items()}, str(corpus / "seed2.safetensors"))
    with pytest.raises(ConfigError, match=r"^data\.encode\.vae_path=seed2\.safetensors .* is not the AudioVAE "
                                          r"data\.datasets\.0\.path=seed1 was encoded with \(a random-init "
                                          r"AudioVAE \(seed 1, config 'tiny'\)\): set data\.encode\.vae_path=null"):
        _job(corpus, "seed1", "data.encode.vae_path=seed2.safetensors")
    # the same VAE as a file (seed 2 saved) and as the recorded seed agree; null = the recorded seed
    _job(corpus, "seed2", "data.encode.vae_path=seed2.safetensors")
    _job(corpus, "seed1")


def test_latents_of_a_file_vae_need_that_file_for_samples(corpus):
    from voxcpm_train.config.model import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.encode\.vae_path=null means a random-init AudioVAE .* set "
                                          r"data\.encode\.vae_path=\S+vae_a\.safetensors"):
        _job(corpus, "file_a")
    _job(corpus, "file_a", "data.encode.vae_path=copy/audiovae.safetensors")   # a re-saved copy is the same VAE


def test_vae_config_mismatch_names_the_preset(corpus):
    from voxcpm_train.config.model import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.encode\.vae_config=small but .*seed1 was encoded with .*"
                                          r"set data\.encode\.vae_config=tiny$"):
        _job(corpus, "seed1", "data.encode.vae_config=small")


def test_datasets_of_two_vaes_are_an_error(corpus):
    from voxcpm_train.config.model import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.datasets\.1\.path=seed2 was encoded with a random-init "
                                          r"AudioVAE \(seed 2.*but data\.datasets\.0\.path with .*seed 1"):
        _job(corpus, "seed1", "data.datasets.1.path=seed2")
    with pytest.raises(ConfigError, match=r"^data\.validation_path=file_a was encoded with"):
        _job(corpus, "seed1", "data.validation_path=file_a", "logging.val_every=5")


def test_a_checkpoint_whose_exported_vae_differs_is_an_error(corpus, tmp_path):
    from voxcpm_train.config.model import ConfigError

    ckpt = tmp_path / "import"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "extra_state.json").write_text(json.dumps({"extra": {}}))
    (ckpt / "hf_assets").mkdir()
    shutil.copyfile(corpus / "copy/audiovae.safetensors", ckpt / "hf_assets/audiovae.safetensors")
    with pytest.raises(ConfigError, match=r"^checkpoint\.load=\S+: its AudioVAE \S+hf_assets/audiovae\.safetensors "
                                          r"\(what voxcpm-export ships.*is not the one data\.datasets\.0\.path="
                                          r"seed1 was encoded with"):
        _job(corpus, "seed1", f"checkpoint.load={ckpt}")
    _job(corpus, "file_a", f"checkpoint.load={ckpt}", f"data.encode.vae_path={corpus}/vae_a.safetensors")


def test_random_init_latents_warn_loudly_outside_the_demo(corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="voxcpm_train"):
        _job(corpus, "seed1")
    assert "RANDOM-INIT AudioVAE (seed 1)" in caplog.text and "--vae" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="voxcpm_train"):
        _job(corpus, "seed1", "data.encode.allow_random_init=true")      # experiment=demo sets it
        _job(corpus, "file_a", f"data.encode.vae_path={corpus}/vae_a.safetensors")
    assert "RANDOM-INIT" not in caplog.text


def test_export_check(corpus, caplog):
    from safetensors.torch import save_file

    from data_pipeline.audio_vae import AudioVAEConfig, load_audio_vae
    from voxcpm_train.convert.mapping import ConversionError
    from voxcpm_train.training.vae_provenance import check_export_vae

    seed1 = json.loads((corpus / "seed1/meta.json").read_text())["vae"]
    file_a = json.loads((corpus / "file_a/meta.json").read_text())["vae"]
    assert file_a["fingerprint"] and "fingerprint" not in seed1
    check_export_vae(file_a, corpus / "copy", "ckpt")          # the same tensors
    check_export_vae(None, corpus / "copy", "ckpt")            # an import: nothing recorded
    with pytest.raises(ConversionError, match=r"copy/audiovae\.safetensors .* is not the AudioVAE the training "
                                              r"latents of ckpt were encoded with \(a random-init AudioVAE "
                                              r"\(seed 1.*Pass --assets"):
        check_export_vae(seed1, corpus / "copy", "ckpt")
    vae1, _ = load_audio_vae(None, AudioVAEConfig.preset("tiny"), with_decoder=True, seed=1)
    (corpus / "random1").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae1.state_dict().items()}, str(corpus / "random1/audiovae.safetensors"))
    with caplog.at_level(logging.WARNING, logger="voxcpm_train"):
        check_export_vae(seed1, corpus / "random1", "ckpt")    # what a demo run's hf_assets holds
    assert "RANDOM-INIT AudioVAE (seed 1)" in caplog.text
