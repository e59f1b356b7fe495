"""Three curriculum stages on one run dir: the LR of every step follows the configured WSD curve
(computed here independently from the stage YAML files), the anneal doubles the global batch, each stage
switches the data blend and keeps the optimizer state; the last checkpoint exports to a folder that
voxcpm==2.0.3 loads with no missing/unexpected keys, whose forward loss equals ours on the same batch and
flow-matching draws and whose generate() returns finite 48 kHz audio; our own sampler writes a wav."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from test_train_utils import REPO, _env, demo_latents, metrics, run_train  # noqa: F401
from test_model_parity import replay_reference_draws

STAGE_ENDS = {"pretrain": 8, "joint": 12, "anneal": 16}
WARMUP = 5


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory, demo_latents):
    run_dir = tmp_path_factory.mktemp("curriculum") / "run"
    for stage, end in STAGE_ENDS.items():
        extra = ["logging.sample_at_end=true"] if stage == "anneal" else []
        run_train(run_dir, demo_latents, f"stage={stage}", f"train.max_steps={end}",
                  f"stage.lr_warmup_steps={WARMUP}", "checkpoint.every=0", "checkpoint.keep_last=0", *extra)
    return run_dir


def _yaml(path):
    return OmegaConf.to_container(OmegaConf.load(REPO / path))


def expected_lrs():
    """LR of each step from the config files: megatron semantics (lr of step s = schedule at the samples
    consumed before s), linear warmup from 0 over WARMUP steps, stable, then the anneal's decay."""
    demo = _yaml("configs/experiment/demo.yaml")
    max_lr, min_lr = demo["optim"]["lr"], demo["optim"]["min_lr"]
    gbs = demo["parallel"]["global_batch_size"]
    anneal = _yaml("configs/stage/anneal.yaml")
    assert anneal["decay_steps"] == -1 and anneal["global_batch_mult"] == 2
    a_min = anneal["min_lr"] if anneal["min_lr"] is not None else min_lr
    style = anneal["lr_wsd_decay_style"]
    lrs, consumed = {}, 0
    a_start = STAGE_ENDS["joint"]
    a_samples0 = a_start * gbs
    a_len = (STAGE_ENDS["anneal"] - a_start) * gbs * 2
    for step in range(1, STAGE_ENDS["anneal"] + 1):
        if step <= a_start:
            lrs[step] = max_lr * min(consumed / (WARMUP * gbs), 1.0)
            consumed += gbs
        else:
            r = (consumed - a_samples0) / a_len
            coeff = {"cosine": 0.5 * (math.cos(math.pi * r) + 1), "linear": 1 - r}[style]
            lrs[step] = a_min + coeff * (max_lr - a_min)
            consumed += 2 * gbs
    return lrs


def test_lr_curve_batch_and_blend(curriculum_run):
    rows = metrics(curriculum_run)
    assert [r["step"] for r in rows] == list(range(1, STAGE_ENDS["anneal"] + 1))
    want = expected_lrs()
    for r in rows:
        assert r["lr"] == pytest.approx(want[r["step"]], rel=1e-9, abs=1e-15), r["step"]
        assert math.isfinite(r["loss"]) and not r["skipped"]
    stage_of = {r["step"]: r["stage"] for r in rows}
    assert stage_of[8] == "pretrain" and stage_of[9] == "joint" and stage_of[13] == "anneal"
    gbs = {r["step"]: r["global_batch_size"] for r in rows}
    assert gbs[12] == 4 and gbs[13] == 8
    consumed = [r["consumed_samples"] for r in rows]
    assert consumed[11] == 48 and consumed[-1] == 48 + 4 * 8
    # the loss falls over the run
    assert np.mean([r["loss"] for r in rows[-4:]]) < np.mean([r["loss"] for r in rows[:4]])

    # blend switch + kept optimizer state: the saved state at the end of each stage
    names = [d["name"] for d in _yaml("configs/experiment/demo.yaml")["data"]["datasets"]]
    for stage, end in STAGE_ENDS.items():
        meta = json.loads((curriculum_run / "checkpoints" / f"step_{end:07d}" / "extra_state.json").read_text())
        blend = _yaml(f"configs/stage/{stage}.yaml")["blend"]
        assert meta["extra"]["data"]["weights"] == [float(blend.get(n, 0.0)) for n in names], stage
        assert meta["extra"]["stage"]["name"] == stage
        assert meta["optimizer"]["step"] == end        # Adam state carried on across the switches
    assert meta["scheduler"]["num_steps"] == 48 + 4 * 8


def test_own_sampler_wav(curriculum_run):
    wavs = sorted((curriculum_run / "samples").glob("step_0000016_*.wav"))
    assert wavs, "sample_at_end wrote no wav"
    audio, sr = sf.read(wavs[0])
    assert sr == 48000 and len(audio) > 0 and np.isfinite(audio).all()
    assert (curriculum_run / "loss_curve.png").stat().st_size > 0


def _batch(latents):
    from data_pipeline.latent_dataset import LatentDataset
    from data_pipeline.sequences import build_sequence
    from data_pipeline.tokenizer import TextTokenizer

    ds = LatentDataset(latents, TextTokenizer(REPO / "demo_data/tokenizer"), 4)
    seqs = [build_sequence(ds.text_ids(i), ds.latent(i), 4) for i in (0, 1)]
    T = max(len(s["text_tokens"]) for s in seqs)
    batch = {}
    for k in seqs[0]:
        arr = np.zeros((2, T) + seqs[0][k].shape[1:], dtype=seqs[0][k].dtype)
        for b, s in enumerate(seqs):
            arr[b, :len(s[k])] = s[k]
        batch[k] = torch.from_numpy(arr)
    lengths = [len(s["text_tokens"]) for s in seqs]
    batch["position_ids"] = torch.arange(T).expand(2, T).clone()
    batch["segment_ids"] = torch.stack([(torch.arange(T) < L).long() for L in lengths])
    batch["row_seeds"] = torch.tensor([1, 2])
    return batch


@pytest.fixture(scope="module")
def exported(curriculum_run, tmp_path_factory):
    """(training checkpoint, its voxcpm-export folder)."""
    ckpt = curriculum_run / "checkpoints" / f"step_{STAGE_ENDS['anneal']:07d}"
    export = tmp_path_factory.mktemp("export") / "voxcpm2"
    proc = subprocess.run([sys.executable, "-m", "voxcpm_train.convert.cli", "export", str(ckpt), str(export)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ckpt, export


def _our_model(ckpt):
    from voxcpm_train.convert.checkpoint import read_checkpoint_config
    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.parallel.checkpoint import load_checkpoint

    model = VoxCPMModel(read_checkpoint_config(ckpt))
    load_checkpoint(ckpt, [model], optimizer=None, load_rng=False)
    return model


def test_export_loads_in_voxcpm_and_matches(exported, demo_latents, megatron_single):
    from safetensors import safe_open
    from voxcpm.model.voxcpm2 import VoxCPM2Model

    ckpt, export = exported

    ref = VoxCPM2Model.from_local(str(export), optimize=False)
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    with safe_open(str(export / "audiovae.safetensors"), "pt") as f:
        saved_vae = set(f.keys())
    expected = {k for k in ref.state_dict() if not k.startswith("audio_vae.")}
    assert saved == expected, (sorted(expected - saved)[:5], sorted(saved - expected)[:5])
    assert saved_vae == set(ref.audio_vae.state_dict())

    # forward loss: the reference on the export vs ours on the training checkpoint, same batch and draws
    ours = _our_model(ckpt).train()
    ref = ref.float().train()
    batch = _batch(demo_latents)
    B, T, P, D = batch["audio_feats"].shape
    torch.manual_seed(99)
    with torch.no_grad():
        ref_out = ref(batch["text_tokens"], batch["text_mask"], batch["audio_feats"], batch["audio_mask"],
                      batch["loss_mask"], batch["position_ids"], batch["labels"])
        out = ours(batch, draws=replay_reference_draws(99, B * T, P, D, 0.1, -0.4, 1.0))
    n = out["num_loss_positions"]
    assert float(out["diff_sum"] / n) == pytest.approx(float(ref_out["loss/diff"]), rel=1e-5)
    assert float(out["stop_sum"] / n) == pytest.approx(float(ref_out["loss/stop"]), rel=1e-5)

    # generate(): finite 48 kHz audio
    ref = ref.eval()
    torch.manual_seed(0)
    wav = ref.generate("Hello there.", max_len=20, inference_timesteps=4, cfg_value=2.0)
    assert ref.sample_rate == 48000
    assert wav.numel() > 0 and torch.isfinite(wav).all()


def test_sampler_matches_reference_inference(exported, megatron_single):
    """Our autoregressive sampler (full recompute, CFG-Zero*, sway sampling) against the reference's
    KV-cached `_inference` on the same weights, with the solver's start noise at zero (temperature 0)."""
    import functools

    from voxcpm.model.voxcpm2 import VoxCPM2Model

    from data_pipeline.tokenizer import TextTokenizer
    from voxcpm_train.generation.sampler import GenerationConfig, generate_latents

    ckpt, export = exported
    ref = VoxCPM2Model.from_local(str(export), optimize=False).float().eval()
    ref.feat_decoder.forward = functools.partial(ref.feat_decoder.forward, temperature=0.0)
    ids = TextTokenizer(REPO / "demo_data/tokenizer")("Hello there, how are you?")
    K = 6
    text = torch.tensor(ids + [101]).unsqueeze(0)
    L = text.shape[1]
    with torch.no_grad():
        *_, (_, ref_feat, _) = ref._inference(text, torch.ones(1, L), torch.zeros(1, L, 4, 64), torch.zeros(1, L),
                                              min_len=K + 1, max_len=K, inference_timesteps=10, cfg_value=2.0)
    ours = _our_model(ckpt).eval()
    gen = GenerationConfig(max_patches=K, min_patches=K + 1, timesteps=10, cfg_value=2.0, temperature=0.0)
    got = generate_latents(ours, ids, gen)                       # [K * P, 64]
    want = ref_feat.reshape(-1, 64)
    assert got.shape == want.shape == (K * 4, 64)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
