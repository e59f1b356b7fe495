"""LoRA parity with the reference package: a LoRA checkpoint (random tiny reference folder ->
`voxcpm-import` -> adapters on every kind of linear, given random non-zero values -> torch_dist save)
exported as merged weights and as an adapter folder; in `voxcpm` the base folder + adapter
(`load_lora_weights`, `VoxCPM(lora_weights_path=...)`) gives the merged folder's weights and
outputs, and our own LoRA model's losses (reference draws replayed)."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_model_parity import SEED, make_sample, max_rel, pack_row, replay_reference_draws, stack_rows

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

# every linear kind: fused QKV (column, per-group rows), o (row), fused gate/up (column, SwiGLU layout),
# down (row), and plain projections; residual_lm keeps the default (attention only)
ALL_LINEARS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _peft(**lora):
    from voxcpm_train.config.peft import LoraConfig, PeftConfig

    return PeftConfig(method="lora", lora=LoraConfig(**lora))


def _write_lora_checkpoint(root: Path, name: str, import_dir: Path, cfg, peft, seed: int = 0) -> Path:
    """A LoRA model on the imported weights, adapters set to random values, saved as a checkpoint with
    the run's config.yaml (model, peft, checkpoint.load) and the import's assets."""
    from omegaconf import OmegaConf

    from voxcpm_train.convert.checkpoint import build_model, single_process_megatron
    from voxcpm_train.model.lora import apply_peft, lora_modules
    from voxcpm_train.parallel.checkpoint import load_checkpoint, save_checkpoint

    ckpt = root / name
    ckpt.mkdir()
    with single_process_megatron():
        model = build_model(cfg)
        summary = apply_peft(model, peft, seed=seed)
        loaded = load_checkpoint(import_dir, [model], optimizer=None, load_rng=False)
        assert len(loaded.missing_optional) == 2 * len(summary.adapted)   # the import has no adapters
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, module in lora_modules(model):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * 0.5)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.5)
        save_checkpoint(ckpt, [model], extra_state={})
    text = OmegaConf.to_yaml({"model": OmegaConf.structured(cfg), "peft": OmegaConf.structured(peft),
                              "checkpoint": {"load": str(import_dir)}})
    (ckpt / "config.yaml").write_text(text)
    os.symlink(import_dir / "hf_assets", ckpt / "hf_assets")
    return ckpt


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.convert.checkpoint import export_checkpoint, import_folder
    from voxcpm_train.convert.tiny import write_random_reference_folder

    root = tmp_path_factory.mktemp("lora_export")
    cfg = load_model_preset("tiny")
    ref = write_random_reference_folder(root / "ref", cfg, seed=5)
    import_folder(ref, root / "import")
    peft = _peft(base_lm=ALL_LINEARS, feat_decoder=ALL_LINEARS, projections=["enc_to_lm_proj", "fusion_concat_proj"])
    ckpt = _write_lora_checkpoint(root, "ckpt", root / "import", cfg, peft, seed=1)
    export_checkpoint(ckpt, root / "merged")
    export_checkpoint(ckpt, root / "adapter", lora="adapter")
    return {"root": root, "cfg": cfg, "ref": ref, "ckpt": ckpt, "peft": peft}


def _reference(folder: Path, lora_config=None):
    from voxcpm.model.voxcpm2 import VoxCPM2Model

    return VoxCPM2Model.from_local(str(folder), optimize=False, training=True, device="cpu", lora_config=lora_config)


def _reference_with_adapter(base: Path, adapter: Path):
    from safetensors.torch import load_file
    from voxcpm.model.voxcpm2 import LoRAConfig

    model = _reference(base, LoRAConfig(**json.loads((adapter / "lora_config.json").read_text())))
    loaded, skipped = model.load_lora_weights(str(adapter), device="cpu")
    assert skipped == [] and sorted(loaded) == sorted(load_file(str(adapter / "lora_weights.safetensors")))
    return model


def _batch(cfg):
    gen = torch.Generator().manual_seed(3)
    return stack_rows([pack_row([make_sample(kind, cfg.patch_size, cfg.feat_dim, gen)], 16) for kind in ("clone", "tts")])


def _reference_forward(model, batch, capture_pred: bool = False):
    """The training forward (seeded draws); with `capture_pred` also the LocDiT's velocity prediction
    at every position ("pred", captured with a forward hook on `feat_decoder.estimator`)."""
    captured = []
    hook = model.feat_decoder.estimator.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    try:
        torch.manual_seed(SEED)
        out = model(batch["text_tokens"], batch["text_mask"], batch["audio_feats"], batch["audio_mask"],
                    batch["loss_mask"], batch["position_ids"], batch["labels"])
    finally:
        hook.remove()
    if capture_pred:
        out["pred"] = torch.cat(captured)
    return out


def _losses(out):
    return {k: float(out[k]) for k in ("loss/diff", "loss/stop")}


def _effective_weights(model):
    """Reference weights with every LoRALinear folded in: W + scaling·B@A (fp64)."""
    from voxcpm.modules.layers.lora import LoRALinear

    out = {k: v.detach().double() for k, v in model.state_dict().items() if "lora_" not in k and not k.startswith("audio_vae.")}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.weight"] += float(module.scaling) * (module.lora_B.double() @ module.lora_A.double())
    return out


def test_adapter_export_files(lora_run):
    adapter = lora_run["root"] / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["lora_config.json", "lora_info.json", "lora_weights.safetensors"]
    for p in adapter.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    cfg = json.loads((adapter / "lora_config.json").read_text())
    assert cfg["r"] == 8 and cfg["alpha"] == 16 and cfg["enable_lm"] and cfg["enable_dit"] and cfg["enable_proj"]
    assert cfg["target_modules_lm"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    info = json.loads((adapter / "lora_info.json").read_text())
    assert info["base_checkpoint"] == str(lora_run["root"] / "import") and not info["reference_default_lora_config"]


def test_adapter_equals_merged_in_reference(lora_run):
    """voxcpm: base folder + our adapter == our merged folder, weight by weight and in the training
    forward (both losses) to 1e-5; the adapters change the model (the check is not vacuous)."""
    root, cfg = lora_run["root"], lora_run["cfg"]
    with_adapter = _reference_with_adapter(lora_run["ref"], root / "adapter")
    merged = _reference(root / "merged")
    base = _reference(lora_run["ref"])
    eff, want = _effective_weights(with_adapter), {k: v.double() for k, v in merged.state_dict().items()
                                                    if not k.startswith("audio_vae.")}
    assert eff.keys() == want.keys()
    worst = max(max_rel(eff[k], want[k]) for k in want)          # fp32 rounding of the merge
    changed = [k for k in want if not torch.equal(want[k], base.state_dict()[k].double())]
    assert worst < 1e-6, worst
    # every adapted reference linear: q/k/v/o/gate/up/down of base_lm and the LocDiT, o/q/k/v of residual_lm, projections
    assert len(changed) == 2 * 7 + 2 * 4 + 2 * 7 + 2, sorted(changed)
    batch = _batch(cfg)
    with torch.no_grad():
        a, m, b = (_reference_forward(x, batch, capture_pred=True) for x in (with_adapter, merged, base))
    for key in ("loss/diff", "loss/stop"):
        assert abs(float(a[key]) - float(m[key])) <= TOL * abs(float(m[key])), (key, a[key], m[key])
    # the LocDiT's prediction at every position [B*T, D, P]: a function of every adapted linear
    print(f"adapter vs merged: weights max rel {worst:.2e}, LocDiT prediction max rel "
          f"{max_rel(a['pred'], m['pred']):.2e} (vs the base model {max_rel(a['pred'], b['pred']):.2e})")
    assert max_rel(a["pred"], m["pred"]) <= TOL, max_rel(a["pred"], m["pred"])
    assert max_rel(a["pred"], b["pred"]) > 0.1, max_rel(a["pred"], b["pred"])   # the adapters matter


def test_our_lora_model_matches_reference_adapter(lora_run, megatron_single):
    """Our LoRA model loaded from the checkpoint (TP = 1) vs voxcpm's base + adapter, same draws."""
    from voxcpm_train.convert.checkpoint import build_model
    from voxcpm_train.model.lora import apply_peft
    from voxcpm_train.parallel.checkpoint import load_checkpoint

    cfg, batch = lora_run["cfg"], _batch(lora_run["cfg"])
    ours = build_model(cfg).train()
    apply_peft(ours, lora_run["peft"])
    assert load_checkpoint(lora_run["ckpt"], [ours], optimizer=None, load_rng=False).missing_optional == []
    B, T, P, D = batch["audio_feats"].shape
    draws = replay_reference_draws(SEED, B * T, P, D, cfg.flow.cfg_rate, cfg.flow.t_mu, cfg.flow.t_sigma)
    out = ours(batch, draws=draws)
    n = out["num_loss_positions"]
    diff, stop = out["diff_sum"] / n, out["stop_sum"] / n
    (diff + stop).backward()
    ref = _reference_with_adapter(lora_run["ref"], lora_run["root"] / "adapter")
    ref_out = _reference_forward(ref, batch)
    (ref_out["loss/diff"] + ref_out["loss/stop"]).backward()
    got, want = {"loss/diff": float(diff), "loss/stop": float(stop)}, _losses(ref_out)
    for key in want:
        assert abs(got[key] - want[key]) <= TOL * abs(want[key]), (key, got[key], want[key])
    # adapter grads: ours (fused q/k/v and gate/up) vs the reference's per-linear ones; a fused A is
    # shared by its parts, so its grad is the sum of theirs
    from voxcpm_train.convert.mapping import _fuse, entries
    from voxcpm_train.model.lora import lora_modules

    ref_params = dict(ref.named_parameters())
    by_weight = {e.ours: e for e in entries(cfg)}
    worst, count = 0.0, 0
    for name, module in lora_modules(ours):
        entry = by_weight[f"{name}.weight"]
        stems = [r[: -len(".weight")] for r in entry.ref]
        groups = entry.stack.num_query_groups if entry.stack is not None else 0
        want_b = _fuse(entry, [ref_params[f"{s}.lora_B"].grad for s in stems], groups)
        want_a = sum(ref_params[f"{s}.lora_A"].grad for s in stems)
        worst = max(worst, max_rel(module.lora_B.grad, want_b), max_rel(module.lora_A.grad, want_a))
        count += 1
    print(f"ours vs reference + adapter: losses {got} vs {want}; adapter grads max rel {worst:.2e}")
    assert count == 2 * 4 + 2 * 2 + 2 * 4 + 2 and worst <= TOL, (count, worst)


def test_voxcpm_lora_weights_path_with_default_config(lora_run, tmp_path):
    """configs/peft/lora.yaml's defaults are voxcpm's default LoRAConfig: `VoxCPM(base,
    lora_weights_path=adapter)` alone loads every tensor and equals the merged export."""
    from omegaconf import OmegaConf
    from voxcpm import VoxCPM

    from voxcpm_train.config.peft import PeftConfig
    from voxcpm_train.convert.checkpoint import export_checkpoint

    peft = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PeftConfig), OmegaConf.load(ROOT / "configs/peft/lora.yaml")))
    root = lora_run["root"]
    ckpt = _write_lora_checkpoint(tmp_path, "ckpt", root / "import", lora_run["cfg"], peft, seed=2)
    export_checkpoint(ckpt, tmp_path / "adapter", lora="adapter")
    export_checkpoint(ckpt, tmp_path / "merged")
    assert json.loads((tmp_path / "adapter" / "lora_info.json").read_text())["reference_default_lora_config"]
    tts = VoxCPM(str(lora_run["ref"]), enable_denoiser=False, optimize=False, device="cpu",
                 lora_weights_path=str(tmp_path / "adapter"))
    eff = _effective_weights(tts.tts_model)
    merged = _reference(tmp_path / "merged").state_dict()
    worst = max(max_rel(eff[k], merged[k].double()) for k in eff)
    assert worst < 1e-6, worst


def _cli_export(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "voxcpm_train.convert.cli", "export", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_export_cli_and_errors(lora_run, tmp_path):
    """`voxcpm-export --lora adapter` writes the same adapter; what the reference cannot express
    (per-group ranks, a trained base) or a checkpoint without adapters is a one-line error."""
    from safetensors.torch import load_file

    from voxcpm_train.convert.checkpoint import export_checkpoint
    from voxcpm_train.convert.mapping import ConversionError

    root = lora_run["root"]
    proc = _cli_export(lora_run["ckpt"], tmp_path / "cli_adapter", "--lora", "adapter")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(tmp_path / "cli_adapter/lora_weights.safetensors")), load_file(str(root / "adapter/lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    proc = _cli_export(root / "import", tmp_path / "no_lora", "--lora", "adapter")
    assert proc.returncode == 1 and "not a LoRA checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConversionError, match="--assets does not apply"):   # the adapter ships no AudioVAE
        export_checkpoint(lora_run["ckpt"], tmp_path / "assets_adapter", assets=root / "import" / "hf_assets",
                          lora="adapter")

    cfg = lora_run["cfg"]
    ranks = _write_lora_checkpoint(tmp_path, "ranks", root / "import", cfg, _peft(ranks={"feat_decoder": 4}))
    with pytest.raises(ConversionError, match="one rank"):
        export_checkpoint(ranks, tmp_path / "ranks_adapter", lora="adapter")
    export_checkpoint(ranks, tmp_path / "ranks_merged")          # merged weights express anything
    trained = _write_lora_checkpoint(tmp_path, "trained", root / "import", cfg, _peft(train_base=True))
    with pytest.raises(ConversionError, match="train_base"):
        export_checkpoint(trained, tmp_path / "trained_adapter", lora="adapter")
