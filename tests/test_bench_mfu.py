"""`benchmarks/bench_mfu.py` smoke run on the CPU (tiny model, one timed step per config): one JSON line per
config with the fields docs/performance.md reads, and the samples/s summary line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_mfu_tiny_smoke(tmp_path):
    out = tmp_path / "mfu.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_mfu.py"), "--tiny", "--steps", "1",
                           "--warmup", "1", "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    ours, official, summary = lines
    assert "error" not in ours and "error" not in official, lines
    assert ours["config"] == "tiny_sdpa" and ours["step_time_s"] > 0 and ours["model_tflops_per_step"] > 0
    assert ours["real_position_fraction"] > 0.9 and ours["samples_per_s"] > 0 and ours["mfu"] is None
    assert official["trainer"].startswith("voxcpm") and official["samples_per_s"] > 0
    assert summary["ratio"] == pytest.approx(ours["samples_per_s"] / official["samples_per_s"])
