"""The training-memory estimate (`voxcpm-model info --memory`, voxcpm_train.model.memory) against what
torch actually keeps: the activations autograd saves in a bf16 forward of our model (counted with
`saved_tensors_hooks`, by storage, per stack), with and without LoRA / frozen modules / full recompute;
and the VoxCPM2-2B figures (published parameter count, LoRA's trainable count worked out by hand, the
documented 24 GB configuration)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_model_parity import make_sample, pack_row, stack_rows

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3


def _mid_config(recompute=None):
    """A VoxCPM2-shaped model wide enough for the tensor counts to mean something (GQA, q width != hidden
    in LocEnc/LocDiT, RALM without RoPE), in bf16."""
    from voxcpm_train.config.model import load_model_preset

    cfg = load_model_preset("tiny", [
        "lm.hidden_size=256", "lm.ffn_hidden_size=768", "lm.num_attention_heads=8", "lm.kv_channels=32",
        "lm.num_layers=3", "residual_lm_num_layers=2", "encoder.hidden_size=128", "encoder.ffn_hidden_size=256",
        "encoder.kv_channels=48", "dit.hidden_size=128", "dit.ffn_hidden_size=256", "dit.kv_channels=48",
        "rope.short_factor=[]", "rope.long_factor=[]"])
    return dataclasses.replace(cfg, params_dtype="bfloat16", recompute_granularity=recompute)


def _packed_batch(rows: int, T: int):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(rows):
        samples, n = [], 0
        while True:
            s = make_sample("clone" if len(samples) % 2 else "tts", 4, 64, gen)
            if n + len(s["text_tokens"]) > T:
                break
            samples.append(s)
            n += len(s["text_tokens"])
        out.append(pack_row(samples, T))
    return stack_rows(out)


def _saved_by_stack(model, batch) -> dict:
    """Bytes of the tensors autograd saves for backward (unique storages, parameters excluded), by the
    top-level module of the stack that saved them ("other" outside the stacks)."""
    from voxcpm_train.model.transformer import StackBlock

    seen = {"other": {}}

    def recorder(name):
        def pack(t):
            seen.setdefault(name, {})[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        return pack

    for name, module in model.named_modules():
        if isinstance(module, StackBlock):
            def forward(*a, _orig=module.forward, _name=name.split(".")[0], **k):
                with torch.autograd.graph.saved_tensors_hooks(recorder(_name), lambda t: t):
                    return _orig(*a, **k)
            module.forward = forward
    with torch.autograd.graph.saved_tensors_hooks(recorder("other"), lambda t: t):
        model(batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counted, out = set(params), {}
    for name, storages in seen.items():
        out[name] = sum(n for ptr, n in storages.items() if ptr not in counted)
        counted |= set(storages)
    return out


def _peft(method="none", freeze=(), **lora):
    from voxcpm_train.config.peft import LoraConfig, PeftConfig

    return PeftConfig(method=method, freeze=list(freeze), lora=LoraConfig(**lora))


@pytest.mark.parametrize("recompute", [None, "full"], ids=["no-recompute", "full-recompute"])
@pytest.mark.parametrize("peft", [
    _peft(), _peft("lora"), _peft("lora", base_lm=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]),
    _peft(freeze=["feat_encoder"]),
], ids=["full-finetune", "lora", "lora-mlp", "frozen-encoder"])
def test_activation_estimate_matches_saved_tensors(megatron_single, peft, recompute):
    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.model.lora import apply_peft
    from voxcpm_train.model.memory import activation_lines
    from voxcpm_train.training.flops import BatchShape

    cfg = _mid_config(recompute)
    for rows, T in ((2, 64), (1, 256)):
        torch.manual_seed(0)
        model = VoxCPMModel(cfg).train()
        apply_peft(model, peft)
        batch = _packed_batch(rows, T)
        measured = _saved_by_stack(model, batch)
        N = batch["text_mask"].numel()
        lines = activation_lines(cfg, peft, T, rows, elem=2, recompute=recompute or "none",
                                 audio_fraction=float(batch["audio_mask"].sum()) / N,
                                 loss_fraction=float(batch["loss_mask"].sum()) / N,
                                 max_seqlen=max(BatchShape.of_batch(batch, include_padding=True).sequence_lengths))
        est = {line.name.split()[-1]: line.bytes for line in lines if line.name.startswith("activations")}
        for stack in ("feat_encoder", "base_lm", "residual_lm", "feat_decoder"):
            got, want = est[stack], measured.get(stack, 0)
            if want == 0:
                assert got == 0, (stack, got)        # frozen and upstream of everything trainable
            else:
                assert abs(got - want) <= 0.05 * want, (stack, rows, T, got, want)
        assert abs(est["other"] - measured["other"]) <= 0.15 * measured["other"], (est["other"], measured["other"])
        total, want = sum(est.values()), sum(measured.values())
        print(f"{rows}x{T}: estimated {total:,} B, saved by torch {want:,} B ({total / want - 1:+.1%})")
        assert abs(total - want) <= 0.05 * want


def _info_json(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "voxcpm_train.model.cli", "info", "--model", "voxcpm2_2b", "--json",
                           "--memory", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["memory"]


def test_voxcpm2_2b_lora_24gb_configuration():
    """The documented consumer-GPU configuration (docs/lora.md): peft=lora, full recompute, 1 x 2048
    positions; LoRA's trainable count is r·(in + out) summed over the adapted linears, by hand."""
    mem = _info_json("--peft", "lora", "--recompute", "full", "--row-tokens", "2048")
    r = 8
    qkv_lm, proj_lm = r * (2048 + (16 + 2 * 2) * 128), r * (2048 + 2048)
    qkv_dit, proj_dit = r * (1024 + (16 + 2 * 2) * 128), r * (16 * 128 + 1024)
    assert mem["trainable"] == (28 + 8) * (qkv_lm + proj_lm) + 12 * (qkv_dit + proj_dit) == 3_145_728
    assert mem["parameters"] == 2_290_004_544 + mem["trainable"]       # the published count + the adapters
    lines = {line["name"]: line["bytes"] for line in mem["lines"]}
    assert lines["weights"] == 2 * mem["parameters"] and lines["optimizer"] == 12 * mem["trainable"]
    assert lines["activations feat_encoder"] == 0                    # frozen, before everything trainable
    assert mem["device_bytes"] < 24 * GIB
    full = _info_json("--peft", "none", "--row-tokens", "2048")        # what does not fit: full fine-tuning
    assert full["trainable"] == 2_290_004_544 and full["device_bytes"] > 3 * 24 * GIB
    offload = _info_json("--peft", "none", "--recompute", "full", "--cpu-offload", "--row-tokens", "1024")
    assert offload["host_bytes"] == 12 * 2_290_004_544 and offload["device_bytes"] > 24 * GIB
