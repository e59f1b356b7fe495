"""Start-up path checks: every path of the config is resolved against the working directory and checked;
a missing tokenizer / dataset / checkpoint.load / vae_path is one config error naming the key, the value
as given and the resolved path (no traceback), from a directory that is not the repo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_utils import REPO, _env

TOKENIZER = str(REPO / "demo_data/tokenizer")


def _build(cwd: Path, *overrides, experiment: str = "demo"):
    from hydra import compose, initialize_config_dir

    from voxcpm_train.config import register_configs
    from voxcpm_train.config.job import build_job

    register_configs()
    ov = [f"experiment={experiment}", *overrides]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("config", overrides=ov)
    return build_job(cfg, ov, cwd=cwd, check_vae=False)


@pytest.fixture()
def latent_folder(tmp_path) -> Path:
    """A folder that passes the path check (what `voxcpm-data encode` leaves: meta.json first)."""
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents/meta.json").write_text(json.dumps({"format": "voxcpm-latents-v1", "units": []}))
    return tmp_path / "latents"


def test_relative_paths_are_resolved_against_the_working_directory(tmp_path, latent_folder):
    (tmp_path / "tok").symlink_to(TOKENIZER)
    job = _build(tmp_path, "data.tokenizer_path=tok", "data.datasets.0.path=latents", "run.dir=runs/x")
    assert job.data.tokenizer_path == str(tmp_path / "tok")
    assert job.data.datasets[0]["path"] == str(latent_folder)
    assert job.data.datasets[3]["path"] == str(latent_folder)      # interpolated ${data.datasets[0].path}
    assert job.run.dir == str(tmp_path / "runs/x")


@pytest.mark.parametrize("overrides,message", [
    ((), "data.tokenizer_path=demo_data/tokenizer (-> {tmp}/demo_data/tokenizer): no such directory"),
    ((f"data.tokenizer_path={TOKENIZER}", "data.datasets.0.path=nope"),
     "data.datasets.0.path=nope (-> {tmp}/nope): does not exist"),
    ((f"data.tokenizer_path={TOKENIZER}", "data.datasets.0.path=latents", "data.validation_path=val"),
     "data.validation_path=val (-> {tmp}/val): does not exist"),
    ((f"data.tokenizer_path={TOKENIZER}", "data.datasets.0.path=my.jsonl"),
     "data.datasets.0.path=my.jsonl (-> {tmp}/my.jsonl): is a JSONL manifest, not a latent folder: encode it "
     "first: voxcpm-data encode {tmp}/my.jsonl --output"),
    ((f"data.tokenizer_path={TOKENIZER}", "data.datasets.0.path=latents", "data.encode.vae_path=vae.safetensors"),
     "data.encode.vae_path=vae.safetensors (-> {tmp}/vae.safetensors): no such file"),
    ((f"data.tokenizer_path={TOKENIZER}", "data.datasets.0.path=latents", "checkpoint.load=ckpt/import"),
     "checkpoint.load=ckpt/import (-> {tmp}/ckpt/import): no such directory"),
    ((f"data.tokenizer_path={TOKENIZER}", "data.datasets.0.path=latents", "checkpoint.load=latents"),
     "checkpoint.load=latents (-> {tmp}/latents): is not a complete checkpoint"),
])
def test_a_missing_path_names_the_key_and_the_resolved_path(tmp_path, latent_folder, overrides, message):
    from voxcpm_train.config.model import ConfigError

    (tmp_path / "my.jsonl").write_text('{"audio": "a.wav", "text": "hi"}\n')
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, *overrides)
    assert str(err.value).startswith(message.format(tmp=tmp_path)), str(err.value)


def test_finetune_needs_its_checkpoint_and_dataset(tmp_path):
    from voxcpm_train.config.model import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.datasets\.0\.path is not set"):
        _build(tmp_path, experiment="finetune")
    with pytest.raises(ConfigError, match=r"^checkpoint\.load is not set, and data\.tokenizer_path="
                                          r"\$\{checkpoint\.load\}/hf_assets follows it"):
        _build(tmp_path, "data.datasets.0.path=latents", experiment="finetune")


def test_the_cli_prints_one_line_from_another_directory(tmp_path):
    """`voxcpm-train experiment=demo` run outside the repo: demo_data/tokenizer is not there."""
    proc = subprocess.run([sys.executable, "-m", "voxcpm_train.train", "experiment=demo", "run.dir=r"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"voxcpm-train: config error: data.tokenizer_path=demo_data/tokenizer "
                     f"(-> {tmp_path}/demo_data/tokenizer): no such directory (the tokenizer files of the model "
                     f"folder)"], proc.stderr[-2000:]
    assert not (tmp_path / "r/checkpoints").exists()
