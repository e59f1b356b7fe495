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
                           "--warmup", "1", "--recompute-local", "full", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    ours, official, summary = lines
    assert "error" not in ours and "error" not in official, lines
    assert ours["config"] == "tiny_sdpa" and ours["step_time_s"] > 0 and ours["model_tflops_per_step"] > 0
    assert ours["real_position_fraction"] > 0.9 and ours["samples_per_s"] > 0 and ours["mfu"] is None
    # read off the built model's stacks; auto = none on the CPU
    assert (ours["recompute"], ours["recompute_local"], ours["estimated_memory_gib"]) == ("none", "full", None)
    assert official["trainer"].startswith("voxcpm") and official["samples_per_s"] > 0
    assert summary["ratio"] == pytest.approx(ours["samples_per_s"] / official["samples_per_s"])


def test_recompute_choice_fits_one_device(megatron_single):
    """`--recompute auto --recompute-local auto` on VoxCPM2-2B, one 8192-position row per micro-batch, every
    position audio and loss, DP = 1: full/full on an 80 GB H100 (81,559 MiB), LocEnc/LocDiT only on a
    141 GB H200 (143,771 MiB); a fixed choice is kept, and when nothing fits the least memory comes back."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_mfu import choose_recompute

    from voxcpm_train.config.model import load_model_preset

    cfg = load_model_preset("voxcpm2_2b")
    mib = 2 ** 20
    h100, h200 = 0.9 * 81559 * mib, 0.9 * 143771 * mib
    lm, local, est = choose_recompute(cfg, 8192, 1, 1.0, 1.0, h100)
    assert (lm, local) == ("full", "full") and est.device_bytes <= h100
    lm, local, est = choose_recompute(cfg, 8192, 1, 1.0, 1.0, h200)
    assert (lm, local) == ("none", "full") and h100 < est.device_bytes <= h200
    lm, local, est = choose_recompute(cfg, 8192, 1, 1.0, 1.0, h100, recompute_local="none")
    assert (lm, local) == ("full", "none") and est.device_bytes > h100
