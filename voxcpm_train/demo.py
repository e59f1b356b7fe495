"""`make demo`: the whole framework end to end on CPU in a few minutes.

1. encode the bundled Emilia-style corpus (demo_data/emilia) with the small AudioVAE V2 config
   -> demo_data/latents (shards already encoded are kept);
2. train the tiny model through the three curriculum stages on one run dir (runs/demo):
   pretrain (warmup + stable), joint (+ voice design / clone blends), anneal (batch x2, decay);
   every stage is a plain `voxcpm-train experiment=demo stage=... train.max_steps=...` that resumes
   from the previous stage's last checkpoint;
3. export the last checkpoint to runs/demo/export (a folder `voxcpm` loads) and let the reference
   `voxcpm` package generate from it;
4. print where everything went (checkpoints, metrics, loss curve, samples, export).

    python -m voxcpm_train.demo [--run-dir runs/demo] [--steps 40 70 90] [--keep] [--nproc 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("pretrain", "joint", "anneal")


def _run(cmd: list, what: str, env=None) -> None:
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        sys.exit(f"demo: {what} failed (exit {proc.returncode})")
    print(f"=== {what}: done in {time.time() - t0:.0f} s", flush=True)


def entry_point(script: str, *module_args: str) -> list:
    """The installed console script `script` (beside this Python), else `python -m <module_args>`."""
    exe = Path(sys.executable).parent / script
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", *module_args]


def encode_corpus(src: Path, out: Path, env) -> None:
    # `voxcpm-data encode` resumes: shards already complete are not redone, and a folder encoded with
    # other settings is refused with a message naming it.
    _run(entry_point("voxcpm-data", "data_pipeline.cli") + ["encode", str(src), "--output", str(out),
          "--config", "small", "--device", "cpu", "--tokenizer", "demo_data/tokenizer"],
         "encode the demo corpus (AudioVAE V2, small config; token ids stored in the index)", env)


def reference_generate(export: Path, out_wav: Path, text: str) -> dict:
    """Load the export with the reference package and generate (checks the export end to end)."""
    import numpy as np
    import soundfile as sf
    import torch
    from voxcpm.model.voxcpm2 import VoxCPM2Model

    torch.manual_seed(0)
    model = VoxCPM2Model.from_local(str(export), optimize=False)
    wav = model.generate(text, max_len=60, inference_timesteps=10, cfg_value=2.0)
    wav = wav.squeeze().float().cpu().numpy()
    sr = int(model.sample_rate)
    sf.write(out_wav, np.clip(wav, -1, 1), sr)
    return {"seconds": len(wav) / sr, "sample_rate": sr, "finite": bool(np.isfinite(wav).all())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="voxcpm_train.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--corpus", default="demo_data/emilia")
    ap.add_argument("--latents", default="demo_data/latents")
    ap.add_argument("--steps", type=int, nargs=3, default=[40, 70, 90],
                    help="train.max_steps at the end of pretrain, joint, anneal")
    ap.add_argument("--nproc", type=int, default=1, help="processes (torchrun, data parallel) per stage")
    ap.add_argument("--keep", action="store_true", help="keep an existing run dir (resume) instead of starting over")
    args = ap.parse_args(argv)

    t_start = time.time()
    run_dir = Path(args.run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd())] + [p for p in [env.get("PYTHONPATH")] if p])
    if run_dir.exists() and not args.keep:
        print(f"=== removing the previous demo run {run_dir} (use --keep to resume it)")
        shutil.rmtree(run_dir)

    encode_corpus(Path(args.corpus), Path(args.latents), env)

    launcher = train = entry_point("voxcpm-train", "voxcpm_train.train")
    if args.nproc > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", "--master-port=29533"]
        launcher = torchrun + (["--no-python"] + train if len(train) == 1 else train[1:])
    for stage, steps in zip(STAGES, args.steps):
        _run(launcher + ["experiment=demo", f"stage={stage}", f"train.max_steps={steps}", f"run.dir={run_dir}",
                         f"data.datasets.0.path={args.latents}"],
             f"stage {stage}: train to step {steps}", env)

    ckpt_root = run_dir / "checkpoints"
    last = ckpt_root / (ckpt_root / "latest").read_text().strip()
    export = run_dir / "export"
    shutil.rmtree(export, ignore_errors=True)
    _run(entry_point("voxcpm-export", "voxcpm_train.convert.cli", "export") + [str(last), str(export)],
         "export the last checkpoint to a reference model folder", env)

    print("\n=== generate with the reference voxcpm package from the export")
    samples = run_dir / "samples"
    samples.mkdir(exist_ok=True)
    ref = reference_generate(export, samples / "voxcpm_from_export.wav", "Hello, this is a tiny demo model.")
    print(f"    {ref['seconds']:.2f} s at {ref['sample_rate']} Hz, finite: {ref['finite']}")

    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    by_stage = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    print(f"\n=== demo finished in {time.time() - t_start:.0f} s")
    for stage, rs in by_stage.items():
        print(f"    {stage:9s} steps {rs[0]['step']:3d}-{rs[-1]['step']:3d}  global batch {rs[-1]['global_batch_size']}"
              f"  loss {rs[0]['loss']:.3f} -> {rs[-1]['loss']:.3f}  lr {rs[0]['lr']:.2e} -> {rs[-1]['lr']:.2e}")
    print(f"    run dir      {run_dir}/ (config.yaml, train_rank0.log)")
    print(f"    checkpoints  {ckpt_root}/ (latest: {last.name})")
    print(f"    metrics      {run_dir / 'metrics.jsonl'}, {run_dir / 'val_metrics.jsonl'}")
    print(f"    loss curve   {run_dir / 'loss_curve.png'}")
    print(f"    samples      {samples}/ ({', '.join(sorted(p.name for p in samples.glob('*.wav')))})")
    print(f"    export       {export}/ (VoxCPM2Model.from_local / voxcpm.VoxCPM.from_pretrained)")
    print(f"    wandb        {run_dir / 'wandb'} (offline; `wandb sync` to upload)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
