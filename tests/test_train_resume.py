"""Exact resume: a run killed with SIGKILL in the middle and started again with the same command has
bit-identical per-step losses to an uninterrupted run (DP=1 and DP=2, and with async checkpoint saves);
leftovers of an interrupted checkpoint write are ignored; SIGTERM (Slurm preemption) leaves a resumable
checkpoint."""
from __future__ import annotations

import os
import signal
import time

import pytest

from test_train_utils import (checkpoints, demo_latents, kill9, metrics, run_train, start_train,  # noqa: F401
                              wait_for_step)

STEPS = 10
ARGS = (f"train.max_steps={STEPS}", "checkpoint.every=4", "checkpoint.keep_last=2")
KEYS = ("loss", "loss_diff", "loss_stop", "grad_norm", "lr", "skipped")


def _same_steps(a_dir, b_dir):
    a, b = metrics(a_dir), metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in KEYS:
            assert ra[k] == rb[k], f"step {ra['step']} {k}: {ra[k]!r} != {rb[k]!r}"   # bit-identical


def _leave_interrupted_write(run):
    """Leftovers of an interrupted write: a temp dir and a step dir without the COMPLETE marker."""
    root = run / "checkpoints"
    (root / "step_0000009.tmp" / "model").mkdir(parents=True, exist_ok=True)
    (root / "step_0000009" / "model").mkdir(parents=True, exist_ok=True)
    (root / "step_0000009" / "extra_state.json").write_text("{}")


def _check_resumed(out, run):
    log = out.stdout + out.stderr
    assert "resume: loaded" in log and "step_0000009" not in log.split("resume: loaded")[1].split("\n")[0]
    root = run / "checkpoints"
    assert not (root / "step_0000009.tmp").exists() and not (root / "step_0000009").exists()


@pytest.mark.slow
def test_sigterm_then_kill9_resume_dp1(tmp_path, demo_latents):
    ref = tmp_path / "uninterrupted"
    run_train(ref, demo_latents, *ARGS)

    run = tmp_path / "interrupted"
    # 1) SIGTERM (Slurm preemption): checkpoint at the current step, exit 0
    proc = start_train(run, demo_latents, *ARGS)
    wait_for_step(proc, run, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    saved = checkpoints(run)
    step = int(saved[-1].split("_")[1])
    assert 2 <= step < STEPS and max(r["step"] for r in metrics(run)) == step
    assert (run / "checkpoints" / saved[-1] / "COMPLETE").is_file()
    # 2) the same command resumes from it; kill -9 in the middle
    proc = start_train(run, demo_latents, *ARGS)
    wait_for_step(proc, run, step + 3)
    kill9(proc)
    assert max(r["step"] for r in metrics(run)) < STEPS
    _leave_interrupted_write(run)
    # 3) the same command again finishes the run
    out = run_train(run, demo_latents, *ARGS)
    _check_resumed(out, run)
    _same_steps(ref, run)
    assert checkpoints(run) == ["step_0000008", "step_0000010"]    # keep_last=2


@pytest.mark.slow
def test_kill9_resume_dp2(tmp_path, demo_latents):
    ref = tmp_path / "uninterrupted"
    run_train(ref, demo_latents, *ARGS, nproc=2)
    run = tmp_path / "killed"
    proc = start_train(run, demo_latents, *ARGS, nproc=2)
    wait_for_step(proc, run, 6)
    kill9(proc)
    assert max(r["step"] for r in metrics(run)) < STEPS
    _leave_interrupted_write(run)
    out = run_train(run, demo_latents, *ARGS, nproc=2)
    _check_resumed(out, run)
    _same_steps(ref, run)


@pytest.mark.slow
def test_async_save_kill9_resume(tmp_path, demo_latents):
    """checkpoint.async_save=true (megatron's forked writer, distributed optimizer): killed with SIGKILL
    once an async checkpoint is committed, the same command resumes from it and the losses of every step
    equal the uninterrupted synchronous run bit for bit."""
    ref = tmp_path / "uninterrupted"
    run_train(ref, demo_latents, *ARGS)
    run = tmp_path / "async"
    args = (*ARGS, "checkpoint.async_save=true")
    proc = start_train(run, demo_latents, *args)
    latest, t0 = run / "checkpoints" / "latest", time.time()
    while not latest.is_file():                      # written only when the async write is finalized
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.time() - t0 < 240
        time.sleep(0.02)
    kill9(proc)
    done = max(r["step"] for r in metrics(run))
    assert done < STEPS
    from voxcpm_train.training.checkpoint import find_latest

    committed = find_latest(run / "checkpoints").name     # `latest`, or a newer one renamed just before the kill
    assert (run / "checkpoints" / committed / "COMPLETE").is_file()
    out = run_train(run, demo_latents, *args)
    log = out.stdout + out.stderr
    assert f"resume: loaded {run / 'checkpoints' / committed}" in log, log[-3000:]
    assert "scheduled (async)" in log and "committed" in log
    _same_steps(ref, run)
    assert checkpoints(run) == ["step_0000008", "step_0000010"]      # no temp dir left behind
