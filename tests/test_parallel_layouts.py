"""Layout equivalence and resume across layouts (torchrun, 2 processes, gloo, CPU).

A tiny megatron GPT (SwiGLU, RMSNorm, GQA, RoPE; 4 layers) trained with Adam + cosine schedule +
grad clipping on ragged per-token loss masks, through voxcpm_train.parallel. The reference is a
single-process run from the same initial weights (a dist_checkpointing checkpoint).
"""

import json
from pathlib import Path

import pytest

from conftest import run_torchrun

WORKER = Path(__file__).parent / "dist" / "layouts_worker.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    run_torchrun(WORKER, out, "multi", nproc=2, timeout=300)
    run_torchrun(WORKER, out, "single", nproc=1, timeout=200)
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
