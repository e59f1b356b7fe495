"""A short LoRA fine-tuning run with `voxcpm-train` (experiment=demo, peft=lora, checkpoint.load = an
import of a reference folder): stopped by SIGTERM and started again it reproduces the uninterrupted run's
losses bit for bit; its last checkpoint exports as merged weights and as an adapter folder that the
reference package loads on the original folder with the same weights and outputs (which also shows the
frozen base came through training unchanged)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from test_lora_export import _effective_weights, _reference, _reference_forward, _reference_with_adapter
from test_model_parity import max_rel
from test_train_utils import REPO, _env, checkpoints, demo_latents, metrics, run_train, start_train, wait_for_step, write_reference_folder  # noqa: F401

STEPS = 6
KEYS = ("loss", "loss_diff", "loss_stop", "grad_norm", "lr", "skipped")


@pytest.fixture(scope="module")
def base_import(tmp_path_factory):
    """A random reference folder of the demo model (tiny, vocab 1280; the AudioVAE demo_latents were encoded
    with) and its `voxcpm-import`."""
    root = tmp_path_factory.mktemp("lora_train")
    ref = write_reference_folder(root / "ref", seed=11)
    proc = subprocess.run([sys.executable, "-m", "voxcpm_train.convert.cli", "import", str(ref), str(root / "import")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ref, root / "import"


def _export(*args):
    proc = subprocess.run([sys.executable, "-m", "voxcpm_train.convert.cli", "export", *map(str, args)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_exports(tmp_path, demo_latents, base_import):
    ref, imported = base_import
    args = ("peft=lora", f"checkpoint.load={imported}", f"train.max_steps={STEPS}", "checkpoint.every=2",
            "checkpoint.keep_last=2", "stage.lr_warmup_steps=0")
    full = tmp_path / "uninterrupted"
    out = run_train(full, demo_latents, *args)
    assert "peft (lora):" in out.stdout + out.stderr and "initial weights from" in out.stdout + out.stderr

    run = tmp_path / "interrupted"
    proc = start_train(run, demo_latents, *args)
    wait_for_step(proc, run, 2)
    os.killpg(proc.pid, signal.SIGTERM)                 # checkpoint at the current step, exit 0
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert max(r["step"] for r in metrics(run)) < STEPS
    out = run_train(run, demo_latents, *args)
    assert "resume: loaded" in out.stdout + out.stderr
    a, b = metrics(full), metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])      # bit-identical

    last = run / "checkpoints" / checkpoints(run)[-1]
    _export(last, tmp_path / "merged")
    _export(last, tmp_path / "adapter", "--lora", "adapter")
    with_adapter = _reference_with_adapter(ref, tmp_path / "adapter")
    merged, base = _reference(tmp_path / "merged"), _reference(ref)
    eff = _effective_weights(with_adapter)
    want = {k: v.double() for k, v in merged.state_dict().items() if not k.startswith("audio_vae.")}
    assert eff.keys() == want.keys()
    assert max(max_rel(eff[k], want[k]) for k in want) < 1e-6
    changed = [k for k in want if not torch.equal(want[k], base.state_dict()[k].double())]
    assert changed and all(".self_attn." in k for k in changed), changed     # only the adapted linears moved
    from test_lora_export import _batch
    from voxcpm_train.config.model import load_model_preset

    batch = _batch(load_model_preset("tiny"))
    with torch.no_grad():
        pa, pm = (_reference_forward(x, batch, capture_pred=True)["pred"] for x in (with_adapter, merged))
    assert max_rel(pa, pm) <= 1e-5
