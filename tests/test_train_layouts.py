"""A checkpoint saved at PP=2 resumes at TP=2 and at TP=PP=DP=1: the steps after the resume match the
uninterrupted PP=2 run (1e-5 relative), optimizer and scheduler state included."""
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
    for name, layout, nproc in (("single", (), 1), ("tp2", ("parallel.tp=2",), 2)):
        run = tmp_path / name
        out = run_train(run, demo_latents, *ARGS, *layout, f"checkpoint.load={ckpt}", nproc=nproc)
        assert "resume: loaded" in out.stdout + out.stderr
        got = metrics(run)
        assert [r["step"] for r in got] == [4, 5, 6]
        for r in got:
            w = want[r["step"]]
            for k in ("loss", "loss_diff", "loss_stop", "grad_norm"):
                assert r[k] == pytest.approx(w[k], rel=1e-5), (name, r["step"], k)
            assert r["lr"] == w["lr"]
