"""Layout equivalence and resume across layouts (torchrun, 2 processes, gloo, CPU).

Models: the tiny VoxCPM preset (configs/model/tiny.yaml) on packed rows with per-row flow draws,
and a tiny megatron GPT stand-in (SwiGLU, RMSNorm, GQA, RoPE) with ragged loss masks, showing the
runtime is model-agnostic. Adam + warmup/cosine schedule + grad clipping, per-token loss, through
voxcpm_train.parallel. The reference is a single-process run from the same initial weights (a
dist_checkpointing checkpoint); 8 rows per step, micro-batches of 2.
"""

import json
from pathlib import Path

import pytest

from conftest import run_torchrun

WORKER = Path(__file__).parent / "dist" / "layouts_worker.py"
TOL = 1e-5


@pytest.fixture(scope="module", params=["voxcpm", "gpt"])
def runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"layouts_{request.param}")
    env = {"VOXCPM_TEST_MODEL": request.param}
    run_torchrun(WORKER, out, "multi", nproc=2, timeout=300, env=env)
    run_torchrun(WORKER, out, "single", nproc=1, timeout=200, env=env)
    res = json.loads((out / "multi.json").read_text())
    res.update(json.loads((out / "single.json").read_text()))
    return res


def _max_diff(runs, name, steps):
    base = {r["step"]: r for r in runs["baseline"]}
    got = runs[name]
    assert [r["step"] for r in got] == list(steps)
    assert not any(r["skipped"] for r in got)
    for r in got:
        assert r["num_tokens"] == base[r["step"]]["num_tokens"]
        assert r["lr"] == pytest.approx(base[r["step"]]["lr"], rel=1e-12)
    loss = max(abs(r["loss"] - base[r["step"]]["loss"]) for r in got)
    gnorm = max(abs(r["grad_norm"] - base[r["step"]]["grad_norm"]) for r in got)
    print(f"{name}: max |dloss| {loss:.3e}, max |dgrad_norm| {gnorm:.3e}")
    return loss, gnorm


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_layout_matches_single_process(runs, layout):
    """TP=2, PP=2, DP=2 (distributed optimizer): 5 steps equal the single-process run."""
    loss, gnorm = _max_diff(runs, layout, range(1, 6))
    assert loss < TOL and gnorm < TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2_to_pp2", "pp2_to_dp2", "dp2_to_tp1"])
def test_resume_across_layouts(runs, name):
    """Saved after step 3 under one layout, loaded under another: steps 4-6 equal the
    uninterrupted single-process run (model, Adam moments and step, scheduler)."""
    loss, gnorm = _max_diff(runs, name, range(4, 7))
    assert loss < TOL and gnorm < TOL


@pytest.mark.slow
def test_baseline_is_training(runs):
    """The reference itself moves (guards against comparing frozen runs)."""
    losses = [r["loss"] for r in runs["baseline"]]
    assert len(set(losses)) == len(losses)
    assert all(r["grad_norm"] > 0 and not r["skipped"] for r in runs["baseline"])


@pytest.mark.slow
def test_nonfinite_step_is_skipped(runs):
    """NaN loss on the last PP stage only: both stages skip; weights and Adam step untouched."""
    assert runs["nan_step"] == {"skipped": True, "params_unchanged": True,
                                "adam_step_unchanged": True}


@pytest.mark.slow
def test_same_layout_reload_restores_rank_state(runs):
    assert runs["same_layout_reload"] == {"rng_restored": True, "rank_state": {"who": 0}}


@pytest.mark.slow
def test_bf16_resume_across_optimizer_kinds(tmp_path):
    """bf16 params with fp32 main params/grads (the GPU/NPU recipe, run on CPU). A checkpoint of the
    mixed-precision optimizer (dist0) or the distributed optimizer (dist1) loads into either kind
    with the fp32 main params, Adam moments and step exactly as saved, and a same-kind resume
    continues bit-exactly like the uninterrupted run. (Across kinds the continuation differs at
    bf16 rounding level, ~1e-4, as do the two uninterrupted runs.)"""
    run_torchrun(WORKER, tmp_path, "bf16", nproc=1, timeout=200)
    res = json.loads((tmp_path / "bf16.json").read_text())
    for src in (0, 1):
        for dst in (0, 1):
            assert res[f"state_diff_dist{src}_to_dist{dst}"] == 0.0, (src, dst)
            assert not any(r["skipped"] for r in res[f"bf16_dist{src}_to_dist{dst}"])
        ref = [(r["loss"], r["grad_norm"]) for r in res[f"bf16_ref_dist{src}"][3:]]
        got = [(r["loss"], r["grad_norm"]) for r in res[f"bf16_dist{src}_to_dist{src}"]]
        assert got == ref, (src, got, ref)
    # the tiny VoxCPM model trains in bf16 from the same (rounded) initial weights as in fp32
    for r16, r32 in zip(res["voxcpm_bf16_1"], res["voxcpm_bf16_0"]):
        assert not r16["skipped"] and abs(r16["loss"] - r32["loss"]) < 0.01 * r32["loss"]
