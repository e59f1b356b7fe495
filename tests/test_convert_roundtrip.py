"""Weights in and out through real checkpoints: a random reference `VoxCPM2Model` folder ->
`voxcpm-import` -> torch_dist checkpoint -> (TP = 2 / PP = 2 loads with torchrun, a TP = 2
training-style save with optimizer state) -> `voxcpm-export` -> `VoxCPM2Model.from_local`, key by
key and bit for bit.

This file is also the torchrun worker (`python -m torch.distributed.run ... test_convert_roundtrip.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _run_cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [PY, "-m", "voxcpm_train.convert.cli", *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _ref_weights(folder: Path):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------- torchrun worker


def _worker(ref_dir: Path, ckpt_dir: Path, out_dir: Path) -> None:
    """Two processes: load the imported checkpoint at TP = 2 and at PP = 2 (uneven cut [1, 3]) and
    compare every local tensor with the pure mapping; then save a TP = 2 checkpoint with a
    distributed optimizer's state from weights doubled (exactly) for the export test."""
    sys.path.insert(0, str(ROOT))
    from voxcpm_train.platform import init_distributed, setup_platform

    platform = setup_platform("cpu")
    init_distributed(platform, timeout_s=120)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.convert.checkpoint import read_checkpoint_config
    from voxcpm_train.convert.mapping import reference_to_ours
    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.parallel import build_model_chunks, build_optimizer, initialize_model_parallel
    from voxcpm_train.parallel.checkpoint import load_checkpoint, save_checkpoint
    from voxcpm_train.parallel.optim import inner_optimizers

    torch.set_num_threads(1)
    ref = _ref_weights(ref_dir)
    base_cfg = read_checkpoint_config(ckpt_dir)
    report = {}
    for name, tp, pp, layers in (("tp2", 2, 1, None), ("pp2", 1, 2, [1, 3])):
        cfg = dataclasses.replace(base_cfg, pipeline_layers=layers)
        initialize_model_parallel(tp, pp)
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()

        def provider(pre_process, post_process):
            return VoxCPMModel(cfg, pre_process, post_process)

        ddp = DistributedDataParallelConfig(use_distributed_optimizer=True)
        chunks = build_model_chunks(provider, ddp)
        model = chunks[0].module
        load_checkpoint(ckpt_dir, chunks, optimizer=None, load_rng=False)
        want = reference_to_ours(ref, cfg, tp, tp_rank, pp, pp_rank)
        have = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
        bad = sorted(set(want) ^ set(have)) + sorted(k for k in want if k in have and not torch.equal(want[k], have[k]))
        report[f"{name}_rank{dist.get_rank()}"] = {"keys": len(have), "bad": bad}
        if name == "tp2":
            opt = build_optimizer(
                OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), chunks
            )
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(2.0)
            for o in inner_optimizers(opt):
                o.reload_model_params()
            save_checkpoint(out_dir / "tp2_train", chunks, optimizer=opt, extra_state={"step": 1})
            if dist.get_rank() == 0:
                (out_dir / "tp2_train" / "config.yaml").write_text((ckpt_dir / "config.yaml").read_text())
        dist.barrier()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        (out_dir / "report.json").write_text(json.dumps({k: v for r in gathered for k, v in r.items()}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------- tests

import pytest  # noqa: E402
import torch  # noqa: E402

from voxcpm_train.config.model import load_model_preset  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random tiny reference folder, its import, and the export of that import (CLIs)."""
    from voxcpm_train.convert.tiny import write_random_reference_folder

    root = tmp_path_factory.mktemp("convert")
    ref = write_random_reference_folder(root / "ref", load_model_preset("tiny"), seed=5)
    _run_cli("import", ref, root / "ckpt")
    _run_cli("export", root / "ckpt", root / "exported")
    return root


def _from_local_strict(folder: Path):
    """`VoxCPM2Model.from_local` loads with strict=False: compare the key sets ourselves."""
    from voxcpm.model.voxcpm2 import VoxCPM2Model

    model = VoxCPM2Model.from_local(str(folder), optimize=False, training=True, device="cpu")
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    vae = load_file(str(folder / "audiovae.safetensors"))
    file_keys = set(weights) | {f"audio_vae.{k}" for k in vae}
    model_keys = set(model.state_dict())
    assert model_keys - file_keys == set(), f"missing in the folder: {sorted(model_keys - file_keys)}"
    assert file_keys - model_keys == set(), f"unexpected in the folder: {sorted(file_keys - model_keys)}"
    return model, weights, vae


def test_import_export_round_trip_loads_in_voxcpm(converted):
    ref_dir, out_dir = converted / "ref", converted / "exported"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
    assert json.loads((out_dir / "config.json").read_text()) == json.loads((ref_dir / "config.json").read_text())
    model, weights, vae = _from_local_strict(out_dir)
    original = _ref_weights(ref_dir)
    assert set(weights) == set(original)
    for k, v in original.items():
        assert weights[k].dtype == v.dtype and torch.equal(weights[k], v), k
    sd = model.state_dict()
    for k, v in original.items():
        assert torch.equal(sd[k], v), k  # what voxcpm actually holds after from_local
    from safetensors.torch import load_file

    original_vae = load_file(str(ref_dir / "audiovae.safetensors"))
    assert set(vae) == set(original_vae) and all(torch.equal(vae[k], original_vae[k]) for k in vae)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / name).read_bytes() == (ref_dir / name).read_bytes()


def test_export_casts_to_bfloat16(megatron_single, converted, tmp_path):
    from voxcpm_train.convert.checkpoint import export_checkpoint

    export_checkpoint(converted / "ckpt", tmp_path / "bf16", dtype="bfloat16")
    original = _ref_weights(converted / "ref")
    out = _ref_weights(tmp_path / "bf16")
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], v.to(torch.bfloat16)) for k, v in original.items())
    _from_local_strict(tmp_path / "bf16")


@pytest.mark.slow
def test_checkpoint_reshards_to_tp2_and_pp2_and_exports_from_a_training_save(converted, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    from conftest import free_port

    cmd = [
        PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        __file__, str(converted / "ref"), str(converted / "ckpt"), str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"tp2_rank0", "tp2_rank1", "pp2_rank0", "pp2_rank1"}
    for where, r in report.items():
        assert r["keys"] > 0 and r["bad"] == [], (where, r["bad"])

    # A TP = 2 checkpoint with distributed-optimizer state, exported at TP = 1 (resharded on load).
    ckpt = tmp_path / "tp2_train"
    assert any("optimizer" in k for k in _tensor_keys(ckpt / "model")), "the save should hold optimizer state"
    _run_cli("export", ckpt, tmp_path / "exported", "--assets", converted / "ref")
    _, weights, _ = _from_local_strict(tmp_path / "exported")
    original = _ref_weights(converted / "ref")
    assert set(weights) == set(original)
    for k, v in original.items():
        assert torch.equal(weights[k], v * 2), k


def _tensor_keys(model_dir: Path):
    from megatron.core import dist_checkpointing

    return list(dist_checkpointing.load_tensors_metadata(str(model_dir)))


# ---------------------------------------------------------------------------------------- errors


def test_import_rejects_unmapped_keys_naming_them(tmp_path):
    from safetensors.torch import load_file, save_file

    from voxcpm_train.convert.checkpoint import import_folder
    from voxcpm_train.convert.mapping import ConversionError
    from voxcpm_train.convert.tiny import write_random_reference_folder

    ref = write_random_reference_folder(tmp_path / "ref", load_model_preset("tiny"), seed=2)
    sd = load_file(str(ref / "model.safetensors"))
    sd["base_lm.layers.0.self_attn.q_norm.weight"] = torch.ones(4)
    del sd["stop_head.weight"]
    save_file(sd, str(ref / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        import_folder(ref, tmp_path / "ckpt")
    assert "missing keys (1): stop_head.weight" in str(err.value)
    assert "unexpected keys (1): base_lm.layers.0.self_attn.q_norm.weight" in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_import_with_a_mismatched_config_names_both_shapes(tmp_path):
    from voxcpm_train.convert.checkpoint import import_folder
    from voxcpm_train.convert.mapping import ConversionError
    from voxcpm_train.convert.tiny import write_random_reference_folder

    cfg = load_model_preset("tiny")
    ref = write_random_reference_folder(tmp_path / "ref", cfg, seed=3)
    wrong = dataclasses.replace(cfg, fsq_latent_dim=cfg.fsq_latent_dim * 2)
    with pytest.raises(ConversionError, match=r"fsq_layer.in_proj.weight: converted \(16, 64\) vs model \(32, 64\)"):
        import_folder(ref, tmp_path / "ckpt", model_config=wrong)


def test_export_without_assets_says_what_to_pass(converted, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted / "ckpt", ckpt)
    shutil.rmtree(ckpt / "hf_assets")
    proc = _run_cli("export", ckpt, tmp_path / "out", check=False)
    assert proc.returncode == 1 and "--assets" in proc.stderr
