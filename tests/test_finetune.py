"""`experiment=finetune` as docs/finetune.md runs it, from a working directory that is not the repo: a
JSONL manifest of real clips (decoded from the bundled tars to wav) -> `voxcpm-data encode --vae` of a
released-style model folder -> `voxcpm-import` -> `voxcpm-train experiment=finetune` without a model
preset (the model config comes from the checkpoint) with a held-out validation set -> `voxcpm-export`
(loaded by the reference `voxcpm`, files 0644).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from test_train_utils import REPO, _env, metrics, write_reference_folder

CPU_SIZE = ["stage.lr_warmup_steps=0", "data.row_tokens=256", "data.num_workers=0", "data.window_samples=64",
            "parallel.micro_batch_size=2", "parallel.global_batch_size=4", "platform=cpu", "logging.wandb=false",
            "logging.sample_at_end=false", "logging.log_every=1"]


def write_manifest(root: Path, name: str, clips: slice) -> Path:
    """`<root>/<name>.jsonl` of the official fine-tuner's format ({audio, text, duration}), audio paths
    relative to the manifest: wavs decoded from demo_data/emilia/demo-000000.tar."""
    import soundfile as sf

    wavs = root / "wavs"
    wavs.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(REPO / "demo_data/emilia/demo-000000.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        stems = sorted(n[:-5] for n in members if n.endswith(".json"))[clips]
        for stem in stems:
            meta = json.load(tar.extractfile(members[stem + ".json"]))
            audio = next(n for n in members if n.startswith(stem + ".") and not n.endswith(".json"))
            wav, sr = sf.read(io.BytesIO(tar.extractfile(members[audio]).read()))
            sf.write(wavs / f"{stem}.wav", wav, sr)
            rows.append({"audio": f"wavs/{stem}.wav", "text": meta["text"].strip(), "duration": len(wav) / sr})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def run_in(cwd: Path, *args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def finetune_cmd(*overrides) -> list:
    return ["-m", "voxcpm_train.train", "experiment=finetune", "checkpoint.load=ckpt/release",
            "data.datasets.0.path=latents/train", "data.encode.vae_config=tiny", *CPU_SIZE, *overrides]


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """A user's directory: Release/ (model folder), train/val manifests encoded with its VAE, its import."""
    root = tmp_path_factory.mktemp("user")
    write_reference_folder(root / "Release", vae_config="tiny", vae_seed=103)
    write_manifest(root, "train", slice(0, 8))
    write_manifest(root, "val", slice(8, 11))
    for name in ("train", "val"):
        run_in(root, "-m", "data_pipeline.cli", "encode", f"{name}.jsonl", "--output", f"latents/{name}",
               "--vae", "Release/audiovae.safetensors", "--config", "tiny", "--device", "cpu")
    run_in(root, "-m", "voxcpm_train.convert.cli", "import", "Release", "ckpt/release")
    return root


@pytest.fixture(scope="module")
def finetuned(user) -> Path:
    """Two fine-tuning steps with validation on the held-out set (no model preset given)."""
    proc = run_in(user, *finetune_cmd("run.dir=runs/ft", "train.max_steps=2", "data.validation_path=latents/val",
                                      "logging.val_every=2", "logging.val_batches=1", "checkpoint.every=0"))
    (user / "runs/ft/stdout.txt").write_text(proc.stdout + proc.stderr)
    return user / "runs/ft"


def test_finetune_takes_the_model_config_from_the_checkpoint(user, finetuned):
    from omegaconf import OmegaConf

    imported = OmegaConf.to_container(OmegaConf.load(user / "ckpt/release/config.yaml").model)
    used = OmegaConf.load(finetuned / "config.yaml")
    assert used.model.vocab_size == 1280 != 256          # the checkpoint's, not the default `tiny` preset's
    model = OmegaConf.to_container(used.model)
    for key in ("lm", "encoder", "dit", "rope", "fsq_latent_dim", "residual_lm_num_layers"):
        assert model[key] == imported[key], key
    # relative paths resolved against the user's directory; tokenizer + VAE from the import's hf_assets
    assert used.data.tokenizer_path == str(user / "ckpt/release/hf_assets")
    assert used.data.encode.vae_path == str(user / "ckpt/release/hf_assets/audiovae.safetensors")
    assert used.data.datasets[0].path == str(user / "latents/train")
    rows = metrics(finetuned)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["stage"] == "finetune"
    assert rows[0]["lr"] == rows[1]["lr"] == pytest.approx(1e-5)     # constant LR (stage=finetune)
    val = [json.loads(l) for l in (finetuned / "val_metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [v["step"] for v in val] == [2] and val[0]["loss"] > 0
    assert "from data.validation_path=" in (finetuned / "stdout.txt").read_text()


def test_export_of_the_finetune_loads_in_voxcpm_with_readable_files(user, finetuned):
    from safetensors.torch import load_file
    from voxcpm.model.voxcpm2 import VoxCPM2Model

    ckpt = finetuned / "checkpoints" / (finetuned / "checkpoints/latest").read_text().strip()
    old = os.umask(0o022)
    try:
        run_in(user, "-m", "voxcpm_train.convert.cli", "export", ckpt.relative_to(user), "exported/ft")
    finally:
        os.umask(old)
    out = user / "exported/ft"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes                # safetensors alone writes 0600
    vae = load_file(str(out / "audiovae.safetensors"))
    release_vae = load_file(str(user / "Release/audiovae.safetensors"))
    assert set(vae) == set(release_vae) and all(torch.equal(vae[k], release_vae[k]) for k in vae)
    model = VoxCPM2Model.from_local(str(out), optimize=False, training=True, device="cpu")
    weights = load_file(str(out / "model.safetensors"))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in weights.items())
    before = load_file(str(user / "Release/model.safetensors"))
    assert any(not torch.equal(before[k], weights[k]) for k in weights)      # trained


def test_export_with_another_audiovae_is_refused(user, finetuned):
    other = write_reference_folder(user / "Other", vae_config="tiny", vae_seed=104)   # another AudioVAE
    ckpt = finetuned / "checkpoints" / (finetuned / "checkpoints/latest").read_text().strip()
    proc = run_in(user, "-m", "voxcpm_train.convert.cli", "export", ckpt, "exported/other", "--assets", other,
                  check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is not the AudioVAE the training latents" in proc.stderr and "--assets" in proc.stderr
    assert not (user / "exported/other/model.safetensors").exists()


def test_a_contradicting_model_override_is_one_error_naming_the_key(user):
    proc = run_in(user, *finetune_cmd("run.dir=runs/bad", "model.lm.hidden_size=128"), check=False, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("voxcpm-train: config error: model.lm.hidden_size=128 but "
                              "checkpoint.load=ckpt/release has 64"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "shape mismatch" not in proc.stderr
    assert not (user / "runs/bad/checkpoints").exists()


def _compose(user, *overrides):
    from hydra import compose, initialize_config_dir

    from voxcpm_train.config import register_configs

    register_configs()
    ov = finetune_cmd(*overrides)[2:]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose("config", overrides=ov), ov


def test_resumed_run_keeps_its_model_config_and_rejects_a_contradiction(user, finetuned):
    from voxcpm_train.config.job import build_job
    from voxcpm_train.config.model import ConfigError

    cfg, ov = _compose(user, f"run.dir={finetuned}", "checkpoint.load=null", "data.tokenizer_path=Release",
                       "data.encode.vae_path=Release/audiovae.safetensors", "model.attention_backend=sdpa")
    job = build_job(cfg, ov, cwd=user)
    assert job.model.vocab_size == 1280 and job.model.attention_backend == "sdpa"  # resumed + a run key
    cfg, ov = _compose(user, f"run.dir={finetuned}", "model=voxcpm2_2b")
    with pytest.raises(ConfigError, match=r"model=voxcpm2_2b sets model\.\S+=\S+ but the resumed checkpoint "):
        build_job(cfg, ov, cwd=user)


def test_held_out_validation_reads_only_the_validation_set(user):
    """The validation micro-batches come from data.validation_path only, and the training stream is the
    same with or without it (its loader, order and resume state are untouched)."""
    from data_pipeline.latent_dataset import LatentDataset
    from voxcpm_train.config.job import build_job
    from voxcpm_train.training.data import TrainData, validation_batches

    job = build_job(*_compose(user, "data.validation_path=latents/val"), cwd=user)
    plain = build_job(*_compose(user), cwd=user)

    def frames(path):
        ds = LatentDataset(path)
        return {bytes(row) for i in range(len(ds)) for row in ds.latent(i).astype("float16")}

    val_frames, train_frames = frames(user / "latents/val"), frames(user / "latents/train")
    batch = validation_batches(job, 0, 1, 1)[0]
    feats = batch["audio_feats"][batch["audio_mask"].bool()].reshape(-1, 64).numpy().astype("float16")
    real = [bytes(r) for r in feats if r.any()]
    assert real and all(r in val_frames for r in real)
    # (frames of silence can be equal in both sets: the check counts the frames only one set has)
    assert sum(r in val_frames - train_frames for r in real) > len(real) // 2
    assert not any(r in train_frames - val_frames for r in real)
    a, b = TrainData(job, 0, 1), TrainData(plain, 0, 1)
    for _ in range(3):
        x, y = next(a), next(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a.state_dict() == b.state_dict()


def test_finetune_from_a_training_checkpoint_takes_its_weights_only(user, finetuned):
    """checkpoint.load = a training checkpoint (step 2 of `finetuned`): experiment=finetune
    (checkpoint.load_weights_only=true) starts a new run at step 0 from its weights, instead of continuing
    that run; load_weights_only=false on an import is one config error."""
    ckpt = finetuned / "checkpoints" / (finetuned / "checkpoints/latest").read_text().strip()
    proc = run_in(user, *finetune_cmd(f"checkpoint.load={ckpt}", "run.dir=runs/ft_from_run", "train.max_steps=1",
                                      "data.tokenizer_path=Release", "data.encode.vae_path=Release/audiovae.safetensors",
                                      "logging.val_every=0", "checkpoint.every=0"))
    assert f"initial weights from {ckpt}" in proc.stdout + proc.stderr
    assert [r["step"] for r in metrics(user / "runs/ft_from_run")] == [1]

    bad = run_in(user, *finetune_cmd("checkpoint.load_weights_only=false", "run.dir=runs/ft_bad", "train.max_steps=1",
                                     "logging.val_every=0"), check=False)
    assert bad.returncode == 2 and "checkpoint.load_weights_only=false" in bad.stderr, bad.stderr[-2000:]
