"""DDP overlap options (torchrun, 2 processes, gloo, DP=2, distributed optimizer): overlap_grad_reduce +
overlap_param_gather over several buckets give the losses and grad norms of plain DDP, and a checkpoint
saved right after a step (parameter all-gather still pending) holds the updated weights."""

import json
from pathlib import Path

import pytest

from conftest import run_torchrun

WORKER = Path(__file__).parent / "dist" / "overlap_worker.py"


@pytest.mark.slow
def test_overlap_grad_reduce_and_param_gather(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=2, timeout=300)
    res = json.loads((tmp_path / "overlap.json").read_text())
    plain, overlap = res["overlap=False"], res["overlap=True"]
    assert plain["buckets"] == 1 and overlap["buckets"] > 1 and overlap["hooked"] and not plain["hooked"]
    for a, b in zip(plain["steps"], overlap["steps"]):
        assert not a["skipped"] and not b["skipped"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5, (a, b)
    print(f"\nsaved weights vs plain DDP after step 3: max |diff| {res['saved_vs_reference']:.2e}")
    assert res["saved_vs_reference"] < 1e-5
