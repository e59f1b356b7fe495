"""Helpers of the training tests: a session-wide encoded demo shard and `voxcpm-train` subprocesses.

(Collected by pytest as a module without tests; imported by the other test_train*.py modules.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled",
               HYDRA_FULL_ERROR="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="session")
def demo_latents(tmp_path_factory) -> Path:
    """The first tar of the bundled corpus encoded with the small AudioVAE config (once per session)."""
    out = tmp_path_factory.mktemp("latents") / "demo"
    cmd = [sys.executable, "-m", "data_pipeline.cli", "encode", str(REPO / "demo_data/emilia/demo-000000.tar"),
           "--output", str(out), "--config", "small", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def write_reference_folder(path, vae_config: str = "small", vae_seed: int = 0, seed: int = 3,
                           vocab_size: int = 1280) -> Path:
    """A reference model folder (the tiny model, the demo tokenizer) whose AudioVAE is the seeded random init
    of our `vae_config` preset: the VAE `voxcpm-data encode --config <vae_config> --seed <vae_seed>` encodes
    with when no --vae is given (demo_latents: small, seed 0), so a run from its import passes the AudioVAE
    provenance check."""
    import dataclasses
    import shutil

    from safetensors.torch import save_file

    from data_pipeline.audio_vae import AudioVAEConfig, load_audio_vae
    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.convert.tiny import write_random_reference_folder

    cfg = dataclasses.replace(load_model_preset("tiny"), vocab_size=vocab_size)
    vae_cfg = AudioVAEConfig.preset(vae_config)
    path = write_random_reference_folder(path, cfg, audio_vae_config=vae_cfg.to_dict(), seed=seed)
    vae, _ = load_audio_vae(None, vae_cfg, with_decoder=True, seed=vae_seed)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path / "audiovae.safetensors"))
    for f in (REPO / "demo_data/tokenizer").iterdir():
        shutil.copyfile(f, path / f.name)
    return path


def train_cmd(run_dir, latents, *overrides, nproc: int = 1) -> list:
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                    "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "voxcpm_train.train"]
    else:
        launcher = [sys.executable, "-m", "voxcpm_train.train"]
    return launcher + ["experiment=demo", f"run.dir={run_dir}", f"data.datasets.0.path={latents}",
                       "logging.wandb=false", "logging.sample_at_end=false", "logging.val_every=0",
                       *overrides]


def run_train(run_dir, latents, *overrides, nproc: int = 1, timeout: float = 300, check: bool = True):
    proc = subprocess.run(train_cmd(run_dir, latents, *overrides, nproc=nproc), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"voxcpm-train failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def start_train(run_dir, latents, *overrides, nproc: int = 1) -> subprocess.Popen:
    """Start a run in its own process group (so kill -9 reaches torchrun and its workers)."""
    return subprocess.Popen(train_cmd(run_dir, latents, *overrides, nproc=nproc), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> int:
    """Wait until metrics.jsonl shows `step` (or more); returns the last logged step."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        last = last_step(run_dir)
        if last >= step:
            return last
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before step {step}:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def last_step(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip().endswith("}")]
    return max(steps, default=0)


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def metrics(run_dir) -> list:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def checkpoints(run_dir) -> list:
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
