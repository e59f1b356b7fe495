"""Training throughput: `voxcpm-train` vs the official fine-tuner's logic, same CPU, model and data.

Official (voxcpm==2.0.3 package, as its fine-tuning script does): a batch of B utterances
(raw 16 kHz audio + text ids, padded with -100 as `HFVoxCPMDataset.collate_fn`) goes through
`AudioFeatureProcessingPacker` (AudioVAE V2 encode of every utterance inside the step, one padded row
per utterance), `VoxCPM2Model.forward`, backward, grad-norm clip, AdamW, cosine LambdaLR.

Ours: `voxcpm-train experiment=demo` (megatron-core, latents encoded offline by
`voxcpm-data encode`, packed rows, distributed optimizer), read back from run.dir/metrics.jsonl.

Both: the tiny model config (configs/model/tiny.yaml, demo vocab), the small AudioVAE V2 config, the
bundled demo corpus, one process, torch threads = --threads. Reported: utterances/s (the "samples" of a
TTS corpus), real (non-padding) positions/s, seconds per step; the first --warmup steps are not timed.

    python benchmarks/bench_train_vs_official.py [--steps 30] [--batch 8] [--threads 1] [--write-doc]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_corpus(tokenizer_path: Path, corpus: Path):
    """(text ids, 16 kHz float32 audio) of every utterance of the demo corpus."""
    from data_pipeline.audio import decode_audio
    from data_pipeline.encode import iter_inputs
    from data_pipeline.tokenizer import TextTokenizer

    tok = TextTokenizer(tokenizer_path)
    items = []
    for s in iter_inputs([str(corpus)]):
        if isinstance(s, Exception):
            continue
        audio = decode_audio(s.audio, s.key)
        items.append((tok(s.meta["text"]), audio))
    return items


def _official_packer():
    """voxcpm.training.packers.AudioFeatureProcessingPacker, loaded without voxcpm.training/__init__ (whose
    data module needs argbind + datasets, which the fine-tuner's packer does not)."""
    import importlib.util

    import voxcpm

    path = Path(voxcpm.__file__).parent / "training" / "packers.py"
    spec = importlib.util.spec_from_file_location("voxcpm_training_packers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.AudioFeatureProcessingPacker


def official_throughput(args, model_cfg, vae_cfg: dict, items, device: str = "cpu", amp_dtype=None,
                        model=None) -> dict:
    """The official fine-tuner's step on `items` [(text ids, 16 kHz audio[, reference audio])]: `args.batch`
    utterances per step (padded), the packer's AudioVAE encode, `VoxCPM2Model.forward` (under
    `torch.autocast(amp_dtype)` if given: the trainer's AMP with fp32 weights), backward, clip, AdamW.
    `model`: a prebuilt `VoxCPM2Model` (default: a random one of `model_cfg` / `vae_cfg`)."""
    import contextlib

    import numpy as np
    import torch
    AudioFeatureProcessingPacker = _official_packer()

    from voxcpm_train.convert.tiny import random_reference_model

    torch.manual_seed(0)
    if model is None:
        model = random_reference_model(model_cfg, vae_cfg, seed=0)
    model = model.to(device).train()
    vae = model.audio_vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    packer = AudioFeatureProcessingPacker(dataset_cnt=1, max_len=model.config.max_length,
                                          patch_size=model.config.patch_size, feat_dim=model.config.feat_dim,
                                          audio_vae=vae)
    params = [p for n, p in model.named_parameters() if not n.startswith("audio_vae.")]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.95))
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    autocast = (lambda: torch.autocast(device_type=str(device).split(":")[0], dtype=amp_dtype)) if amp_dtype \
        else contextlib.nullcontext

    def pad(seqs, value):
        n = max(len(x) for x in seqs)
        return torch.stack([torch.nn.functional.pad(torch.as_tensor(x, dtype=torch.float32), (0, n - len(x)),
                                                    value=value) for x in seqs])

    times, pack_times, utts, positions = [], [], 0, 0
    for step in range(total):
        idx = rng.choice(len(items), size=args.batch, replace=False)
        batch_text = pad([items[i][0] for i in idx], -100).to(torch.int32).to(device)
        batch_audio = pad([items[i][1] for i in idx], -100.0).to(device)
        refs = [items[i][2] if len(items[i]) > 2 else [] for i in idx]
        batch_ref = pad([r if len(r) else [-100.0] for r in refs], -100.0).to(device) if any(len(r) for r in refs) else None
        sync()
        t0 = time.perf_counter()
        packed = packer(audio_tokens=batch_audio, text_tokens=batch_text,
                        task_ids=torch.ones(args.batch, dtype=torch.int32),
                        dataset_ids=torch.zeros(args.batch, dtype=torch.int32), is_prompts=[False] * args.batch,
                        ref_audio_tokens=batch_ref)
        sync()
        t_pack = time.perf_counter() - t0
        with autocast():
            out = model(packed["text_tokens"], packed["text_mask"], packed["audio_feats"], packed["audio_mask"],
                        packed["loss_mask"], packed["position_ids"], packed["labels"])
            loss = out["loss/diff"] + out["loss/stop"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        sync()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            pack_times.append(t_pack)
            utts += args.batch
            positions += int((packed["text_mask"] + packed["audio_mask"]).sum())
        if step % 10 == 0:
            print(f"  official step {step + 1}/{total}: {dt:.3f} s, loss {float(loss):.3f}", flush=True)
    t = sum(times)
    return {"utterances_per_s": utts / t, "positions_per_s": positions / t, "s_per_step": t / len(times),
            "vae_encode_share": sum(pack_times) / t,
            "positions_per_s_without_encode": positions / (t - sum(pack_times)),
            "batch": f"{args.batch} utterances, padded"}


def ours_throughput(args, latents: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="bench_ours_"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO))
    total = args.warmup + args.steps
    cmd = [sys.executable, "-m", "voxcpm_train.train", "experiment=demo", f"run.dir={run_dir}",
           f"data.datasets.0.path={latents}", f"train.max_steps={total}", "checkpoint.every=0",
           "checkpoint.save_at_end=false", "logging.sample_at_end=false", "logging.val_every=0",
           "logging.wandb=false", "logging.loss_plot=false", f"platform.threads={args.threads}",
           "stage.lr_warmup_steps=0", f"parallel.global_batch_size={args.rows}", "parallel.micro_batch_size=2"]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    shutil.rmtree(run_dir, ignore_errors=True)
    t = sum(r["step_time_s"] for r in rows)
    return {"utterances_per_s": sum(r["utterances_per_s"] * r["step_time_s"] for r in rows) / t,
            "positions_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in rows) / t,
            "s_per_step": t / len(rows), "batch": f"{args.rows} packed rows x 256 positions"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="official: utterances per step")
    ap.add_argument("--rows", type=int, default=8, help="ours: packed rows per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latents", default=None, help="encoded demo corpus (default: encode into a temp dir)")
    ap.add_argument("--write-doc", action="store_true", help="write the result into docs/performance.md")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from data_pipeline.audio_vae import AudioVAEConfig
    from voxcpm_train.config.model import load_model_preset

    model_cfg = load_model_preset("tiny")
    model_cfg.vocab_size = 1280          # the demo tokenizer (as experiment=demo)
    vae_cfg = AudioVAEConfig.preset("small").to_dict()

    latents = Path(args.latents) if args.latents else None
    if latents is None:
        latents = Path(tempfile.mkdtemp(prefix="bench_latents_")) / "demo"
        print("encoding the demo corpus (small AudioVAE config) ...", flush=True)
        subprocess.run([sys.executable, "-m", "data_pipeline.cli", "encode", str(REPO / "demo_data/emilia"),
                        "--output", str(latents), "--config", "small", "--device", "cpu"], cwd=REPO, check=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads)),
                       capture_output=True)
    items = load_corpus(REPO / "demo_data/tokenizer", REPO / "demo_data/emilia")
    print(f"official fine-tuner logic: {len(items)} utterances, batch {args.batch}", flush=True)
    official = official_throughput(args, model_cfg, vae_cfg, items)
    print(f"voxcpm-train: {args.rows} rows per step", flush=True)
    ours = ours_throughput(args, latents)
    ratio = ours["utterances_per_s"] / official["utterances_per_s"]
    result = {"official": official, "ours": ours, "ratio_utterances_per_s": ratio,
              "ratio_positions_per_s": ours["positions_per_s"] / official["positions_per_s"],
              "cpu": platform.processor() or platform.machine(), "threads": args.threads, "steps": args.steps}
    print(json.dumps(result, indent=1))
    if args.write_doc:
        write_doc(result)


SECTION = "## Training throughput"


def write_doc(r: dict) -> None:
    o, u = r["official"], r["ours"]
    text = f"""{SECTION}

`benchmarks/bench_train_vs_official.py` — same CPU ({r['cpu']}, {r['threads']} thread), tiny model config
(`configs/model/tiny.yaml`, demo vocabulary), small AudioVAE V2 config, bundled demo corpus, one process,
{r['steps']} timed steps.

| trainer | batch | s / step | utterances / s | real positions / s |
|---|---|---|---|---|
| official fine-tuner logic (`voxcpm` 2.0.3: padded rows, AudioVAE encode in every step, AdamW) | {o['batch']} | {o['s_per_step']:.3f} | {o['utterances_per_s']:.1f} | {o['positions_per_s']:.0f} |
| `voxcpm-train` (megatron-core, offline latents, packed rows, distributed optimizer) | {u['batch']} | {u['s_per_step']:.3f} | {u['utterances_per_s']:.1f} | {u['positions_per_s']:.0f} |

**Ratio (ours / official): {r['ratio_utterances_per_s']:.2f}x utterances/s, {r['ratio_positions_per_s']:.2f}x real positions/s.**
In the official step, the AudioVAE encode (packer) takes {100 * o['vae_encode_share']:.0f} % of the time even with the
small VAE config; ours encodes once, offline (`voxcpm-data encode`), and packs rows (no padding
positions). Leaving the encode out of the official step, it trains {o['positions_per_s_without_encode']:.0f} real
positions/s: ours is {u['positions_per_s'] / o['positions_per_s_without_encode']:.2f}x that (packing, fewer and larger ops). With the full-size AudioVAE the official per-step encode costs ~1 s per second of audio on
one CPU thread (DESIGN §8), so the gap grows. On one CPU thread a step of the tiny model is dominated by
fixed per-op costs, so this ratio says little about GPUs; GPU throughput (MFU on H100) is measured
separately.
"""
    path = REPO / "docs" / "performance.md"
    old = path.read_text() if path.is_file() else "# Performance\n"
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1:] if nxt >= 0 else "")
    path.write_text(old.rstrip() + "\n\n" + text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
