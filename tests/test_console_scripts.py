"""The installed console scripts work from any working directory (issue 7).

Every command runs as a subprocess in a temporary directory, never the repository root, so nothing is
found through the current directory: the Hydra config tree must come from the installed package
(`voxcpm_train.configs`). One test builds the wheel, installs it into a throw-away venv and runs there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKENIZER = REPO / "demo_data" / "tokenizer"
SCRIPTS = ("voxcpm-train", "voxcpm-data", "voxcpm-import", "voxcpm-export", "voxcpm-model")


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled", **extra)
    return env


def _run(cmd, cwd, env=None, timeout=300, ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}) in {cwd}:\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc


def _script(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"console script {path} not installed (pip install -e '.[test]')")
    return path


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_from_any_directory(name, tmp_path):
    out = _run([_script(name), "--help"], cwd=tmp_path).stdout
    assert "usage" in out.lower() or "== Config ==" in out or "Powered by Hydra" in out, out[:500]


def test_train_config_tree_from_package(tmp_path):
    """`--cfg job` composes the packaged tree; a user's `--config-dir` adds groups without copying ours;
    a missing experiment name is an error (not silently ignored)."""
    train = _script("voxcpm-train")
    job = _run([train, "experiment=demo", "--cfg", "job"], cwd=tmp_path).stdout
    assert "dir: runs/demo" in job and "max_steps: 40" in job

    mine = tmp_path / "my_configs"
    (mine / "experiment").mkdir(parents=True)
    (mine / "model").mkdir()
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny_deeper\nrun:\n  dir: runs/mine\n")
    (mine / "model" / "tiny_deeper.yaml").write_text("defaults:\n  - tiny\nlm:\n  num_layers: 3\n")
    job = _run([train, "--config-dir", mine, "experiment=mine", "stage=joint", "--cfg", "job"], cwd=tmp_path).stdout
    assert "dir: runs/mine" in job and "name: joint" in job        # ours (stage) and theirs (experiment)
    lm = job.split("\n  lm:\n", 1)[1]
    assert "num_layers: 3" in lm.split("\n  residual_lm_num_layers")[0]

    bad = _run([train, "experiment=no_such_experiment", "--cfg", "job"], cwd=tmp_path, ok=False)
    assert bad.returncode != 0 and "experiment/no_such_experiment" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_console_scripts_end_to_end(tmp_path):
    """From a temporary directory: encode -> train (2 steps) -> launch/torchrun.sh resumes at DP=2 (to step 4)
    -> export -> import -> model info. Relative paths land in the working directory."""
    work = tmp_path / "work"
    work.mkdir()
    _run([_script("voxcpm-data"), "encode", REPO / "demo_data/emilia/demo-000000.tar", "--output", "latents",
          "--config", "tiny", "--device", "cpu"], cwd=work)
    summary = json.loads(_run([_script("voxcpm-data"), "inspect", "latents", "--json"], cwd=work).stdout)
    assert summary and (work / "latents" / "meta.json").is_file()

    overrides = ["experiment=demo", "run.dir=run", "data.datasets.0.path=latents", f"data.tokenizer_path={TOKENIZER}",
                 "data.encode.vae_config=tiny", "checkpoint.every=0", "logging.wandb=false",
                 "logging.sample_at_end=false", "logging.val_every=0", "logging.loss_plot=false"]
    _run([_script("voxcpm-train"), *overrides, "train.max_steps=2"], cwd=work)
    ckpts = work / "run" / "checkpoints"
    assert (ckpts / "step_0000002" / "COMPLETE").is_file()

    launched = _run(["bash", REPO / "launch/torchrun.sh", "2", *overrides, "train.max_steps=4"], cwd=work,
                    env=_env(VOXCPM_TRAIN=str(_script("voxcpm-train"))))
    assert "resume: loaded" in launched.stdout + launched.stderr
    assert (ckpts / "step_0000004" / "COMPLETE").is_file()
    steps = [json.loads(l)["step"] for l in (work / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert steps == [1, 2, 3, 4]

    _run([_script("voxcpm-export"), "run/checkpoints/step_0000004", "export"], cwd=work)
    for name in ("config.json", "model.safetensors", "audiovae.safetensors", "tokenizer.json"):
        assert (work / "export" / name).is_file(), name
    _run([_script("voxcpm-import"), "export", "imported"], cwd=work)
    assert (work / "imported" / "extra_state.json").is_file()

    info = json.loads(_run([_script("voxcpm-model"), "info", "--model", "tiny", "--json"], cwd=work).stdout)
    assert info["parameters"]["total"] > 0 and "base_lm" in info["parameters"]


def test_launchers_use_the_console_script():
    """torchrun/Slurm/Ascend launchers run the `voxcpm-train` entry point the README shows."""
    assert "voxcpm-train experiment=demo" in (REPO / "README.md").read_text()
    for name in ("torchrun.sh", "ascend_910.sh", "slurm_h100.sbatch"):
        path = REPO / "launch" / name
        _run(["bash", "-n", path], cwd=REPO)                      # parses
        text = path.read_text()
        assert "voxcpm_train.train" not in text, name
        assert 'VOXCPM_TRAIN="${VOXCPM_TRAIN:-' in text and '"${VOXCPM_TRAIN}"' in text, name


@pytest.mark.slow
def test_wheel_install_in_fresh_venv(tmp_path):
    """`pip wheel .` -> a throw-away venv (--no-deps; dependencies seen through the test venv's
    site-packages) -> `voxcpm-train --cfg job` and `voxcpm-model info` from a temporary directory."""
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("configs", "voxcpm_train", "data_pipeline"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src], cwd=tmp_path, timeout=600)
    wheels = sorted(dist.glob("voxcpm_train-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
                .stdout.strip())
    # the test venv's packages (torch, megatron, hydra, ...) come after the venv's own: a path added by a
    # .pth file is appended, and its own .pth files (our editable finder among them) are not processed
    (site / "test_venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--ignore-installed", "-q",
          wheels[0]], cwd=tmp_path, timeout=600)

    env = _env()
    env.pop("PYTHONPATH", None)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = _run([py, "-c", "import voxcpm_train, voxcpm_train.configs as c; print(voxcpm_train.__file__); "
                            "print(list(c.__path__)[0])"], cwd=cwd, env=env).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where          # the wheel's copy, not the checkout
    assert Path(where[1], "model", "voxcpm2_2b.yaml").is_file()

    job = _run([venv / "bin" / "voxcpm-train", "experiment=demo", "stage=anneal", "--cfg", "job"], cwd=cwd, env=env).stdout
    assert "max_steps: 40" in job and "name: anneal" in job
    info = json.loads(_run([venv / "bin" / "voxcpm-model", "info", "--model", "voxcpm2_2b", "--json", "--memory",
                            "--peft", "lora"], cwd=cwd, env=env).stdout)
    assert info["parameters"]["total"] == 2_290_004_544            # DESIGN §3, from the packaged preset
    assert info["memory"]["device_bytes"] > 0                      # the packaged peft preset
