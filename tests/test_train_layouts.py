"""A checkpoint saved at PP=2 resumes at TP=2 and at TP=PP=DP=1: the steps after the resume match the
uninterrupted PP=2 run (1e-5 relative), optimizer and scheduler state included. At TP=2 only TP rank 0
reads data (it broadcasts the micro-batches over the TP group)."""
from __future__ import annotations

import pytest

from test_train_utils import demo_latents, metrics, run_train  # noqa: F401

ARGS = ("train.max_steps=6", "checkpoint.every=3", "checkpoint.keep_last=0")


@pytest.mark.slow
def test_resume_across_layouts(tmp_path, demo_latents):
    saved = tmp_path / "pp2"
    run_train(saved, demo_latents, *ARGS, "parallel.pp=2", nproc=2)
    want = {r["step"]: r for r in metrics(saved)}
    ckpt = saved / "checkpoints" / "step_0000003"
    for name, layout, nproc in (("single", (), 1), ("tp2", ("parallel.tp=2", "logging.sample_at_end=true"), 2)):
        run = tmp_path / name
        out = run_train(run, demo_latents, *ARGS, *layout, f"checkpoint.load={ckpt}", nproc=nproc)
        assert "resume: loaded" in out.stdout + out.stderr
        if name == "tp2":   # only TP rank 0 built and iterated a training loader; rank 1 got broadcasts
            assert "data: training loaders built on ranks [0] of 2; micro-batches read per rank [6, 0]" \
                in out.stdout + out.stderr
            # both TP ranks ran the sampler in lockstep; TP rank 0 alone wrote the 48 kHz sample
            import numpy as np
            import soundfile as sf

            wavs = sorted((run / "samples").glob("*.wav"))
            assert [w.name for w in wavs] == ["step_0000006_0.wav"], wavs
            audio, sr = sf.read(wavs[0])
            assert sr == 48000 and audio.size > 0 and np.isfinite(audio).all()
        got = metrics(run)
        assert [r["step"] for r in got] == [4, 5, 6]
        for r in got:
            w = want[r["step"]]
            for k in ("loss", "loss_diff", "loss_stop", "grad_norm"):
                assert r[k] == pytest.approx(w[k], rel=1e-5), (name, r["step"], k)
            assert r["lr"] == w["lr"]


@pytest.mark.slow
def test_start_from_import(tmp_path, demo_latents):
    """checkpoint.load of a `voxcpm-import` (weights only): the run starts at step 0 from those weights
    with a fresh optimizer, scheduler and data stream."""
    import subprocess
    import sys

    from test_train_utils import REPO, _env, write_reference_folder

    # its AudioVAE is the one demo_latents were encoded with (a mismatch stops the start-up)
    ref = write_reference_folder(tmp_path / "ref", vae_config="small", vae_seed=0)
    imported = tmp_path / "import"
    proc = subprocess.run([sys.executable, "-m", "voxcpm_train.convert.cli", "import", str(ref), str(imported)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh, run = tmp_path / "fresh", tmp_path / "from_import"
    run_train(fresh, demo_latents, "train.max_steps=3", "stage.lr_warmup_steps=1")
    out = run_train(run, demo_latents, "train.max_steps=3", "stage.lr_warmup_steps=1", f"checkpoint.load={imported}")
    assert "initial weights from" in out.stdout + out.stderr
    a, b = metrics(fresh), metrics(run)
    assert [r["step"] for r in b] == [1, 2, 3] and b[0]["lr"] == 0.0
    assert a[0]["loss"] != b[0]["loss"]       # other weights, same first batch
