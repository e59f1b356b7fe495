"""Data pipeline -> model integration on the demo corpus.

1. Multi-rank encode: `voxcpm-data encode` under torchrun (2 processes, CPU) on a mixed input (a demo
   tar + a JSONL manifest cut into several units, with two bad lines) writes the same shards as a
   single-process run, sample for sample (keys, metadata, latents), and report.json counts add up.
2. Packed == unpacked through the model: the samples of one planner window, (a) packed into rows by the
   loader's packing and (b) one sample per row, padded, in the bucketed batches (`packing: false`), give the
   same summed diffusion / stop losses, number of loss positions and grads on the tiny VoxCPMModel. The
   packed side draws its flow-matching noise itself from `row_seeds`; the unpacked side gets exactly
   those draws, moved to where each sample sits in its own row.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_torchrun
from data_pipeline.config import DataConfig, DatasetConfig, LayoutProbs
from data_pipeline.latent_dataset import LatentDataset
from data_pipeline.loader import MicroBatchAssembler
from data_pipeline.packing import BatchPlanner
from data_pipeline.shards import load_npy, read_member
from data_pipeline.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo_data"
PATH_ENV = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
ENCODE_ARGS = ["--config", "tiny", "--samples-per-shard", "7"]


def _make_inputs(root: Path) -> list[str]:
    """demo-000000.tar as is + demo-000001.tar as a JSONL manifest (22 good lines, one invalid line, one
    line whose audio file is missing: 24 entries -> 4 units of <= 7). 5 units: rank 0 gets 3, rank 1 2."""
    wavs = root / "clips"
    wavs.mkdir(parents=True)
    lines = []
    with tarfile.open(DEMO / "emilia" / "demo-000001.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for name in sorted(members):
        if not name.endswith(".json"):
            continue
        key = name[:-5]
        audio = next(n for n in members if n.startswith(key + ".") and n != name)
        (wavs / audio).write_bytes(members[audio])
        meta = json.loads(members[name])
        lines.append(json.dumps({"audio": f"clips/{audio}", "text": meta["text"], "speaker": meta["speaker"],
                                 "language": meta["language"], "duration": meta["duration"]}))
    lines.insert(9, "{not json")
    lines.insert(17, json.dumps({"audio": "clips/missing.ogg", "text": "gone", "speaker": "x"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return [str(DEMO / "emilia" / "demo-000000.tar"), str(root / "manifest.jsonl")]


def _read_shards(out: Path) -> dict:
    """{unit: [(key, meta json, latent)]} of an encode output folder, read from the tars themselves."""
    meta = json.loads((out / "meta.json").read_text())
    shards = {}
    for unit in meta["units"]:
        with tarfile.open(out / f"{unit}.tar") as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        samples = []
        for (lat_name, lat), (js_name, js) in zip(members[0::2], members[1::2]):
            key = lat_name[: -len(".latent.npy")]
            assert js_name == f"{key}.json"
            samples.append((key, json.loads(js), load_npy(lat)))
        shards[unit] = samples
    return shards


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """The same inputs encoded by one process and by torchrun with 2 processes (tiny AudioVAE, CPU)."""
    root = tmp_path_factory.mktemp("integration")
    inputs = _make_inputs(root / "raw")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "encode", *inputs, "--output",
                           str(root / "single"), *ENCODE_ARGS], env=dict(os.environ, OMP_NUM_THREADS="1", **PATH_ENV),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    t1 = time.time()
    log = run_torchrun("-m", "data_pipeline.cli", "encode", *inputs, "--output", root / "multi", *ENCODE_ARGS,
                       nproc=2, timeout=240, env=PATH_ENV)  # one thread per process, like the run above
    t2 = time.time()
    print(f"\nencode: 1 process {t1 - t0:.1f} s, torchrun x2 {t2 - t1:.1f} s")
    return {"single": root / "single", "multi": root / "multi", "log": log}


def test_multi_rank_encode_equals_single_process(encoded):
    single, multi = encoded["single"], encoded["multi"]
    meta_s, meta_m = (json.loads((d / "meta.json").read_text()) for d in (single, multi))
    assert meta_s == meta_m
    units = meta_s["units"]
    assert units == ["demo-000000", "manifest-000000", "manifest-000001", "manifest-000002", "manifest-000003"]
    # each rank encoded its own units (unit i -> rank i % 2) and said so
    assert "rank 0/2: 3 units" in encoded["log"] and "rank 1/2: 2 units" in encoded["log"]

    a, b = _read_shards(single), _read_shards(multi)
    assert a.keys() == b.keys() == set(units)
    n = 0
    for unit in units:
        assert [s[0] for s in a[unit]] == [s[0] for s in b[unit]], unit
        for (key, meta_a, lat_a), (_, meta_b, lat_b) in zip(a[unit], b[unit]):
            assert meta_a == meta_b, key
            assert lat_a.dtype == lat_b.dtype == np.float16 and lat_a.shape == lat_b.shape, key
            assert lat_a.ndim == 2 and lat_a.shape[1] == 64 and lat_a.shape[0] % 4 == 0, key
            assert np.array_equal(lat_a, lat_b), key
            n += 1
        for suffix in (".tar", ".index.json", ".report.json"):
            assert (single / f"{unit}{suffix}").read_bytes() == (multi / f"{unit}{suffix}").read_bytes(), unit + suffix
    assert n == 45

    # the index sidecars point at the right bytes in the multi-rank shards
    ds = LatentDataset(multi)
    assert len(ds) == 45
    for i in (0, 20, 44):
        s = ds.samples[i]
        shard = ds.shards[ds.shard_id[i]]
        assert json.loads(read_member(shard, *s["json"]))["source_key"] == s["source_key"]
        assert np.array_equal(ds.latent(i), dict((k, z) for k, _, z in b[shard.stem])[s["key"]])

    # report.json: the per-unit reports add up, equal to the single-process run
    rep_s, rep_m = (json.loads((d / "report.json").read_text()) for d in (single, multi))
    assert rep_s == rep_m
    per_unit = [json.loads((multi / f"{u}.report.json").read_text()) for u in units]
    skipped = sum((Counter(r["skipped"]) for r in per_unit), Counter())
    assert rep_m["kept"] == sum(r["kept"] for r in per_unit) == sum(len(b[u]) for u in units) == 45
    assert rep_m["skipped"] == dict(skipped) == {"invalid_json": 1, "missing_pair": 1}
    assert rep_m["skipped_total"] == 2
    assert rep_m["hours"] == round(sum(r["seconds"] for r in per_unit) / 3600, 4)
    assert abs(rep_m["hours"] * 3600 - sum(s["duration"] for s in ds.samples)) < 1.0
    assert rep_m["shards"] == [f"{u}.tar" for u in units]
    assert "skip invalid_json" in encoded["log"] and "skip missing_pair" in encoded["log"]


# --------------------------------------------------------------------------------------------------
# packed == unpacked through the model


def _data_cfg(latents: Path, packing: bool) -> DataConfig:
    return DataConfig(datasets=[DatasetConfig(name="demo", path=str(latents),
                                              layouts=LayoutProbs(0.25, 0.25, 0.25, 0.25))],
                      tokenizer_path=str(DEMO / "tokenizer"), packing=packing, row_tokens=320,
                      rows_per_microbatch=2, token_budget=2048, pad_to_multiple=8, window_samples=14,
                      num_workers=0, seed=11)


def _sample_id(s) -> tuple:
    return (s.ds, s.idx, s.layout, s.ref, s.prompt, s.length)


def _plans(latents: Path, packing: bool) -> tuple:
    """All micro-batch plans of the first planner window; for packing also the rows carried to the next
    window (one more plan), so both sides hold every sample of the window exactly once."""
    cfg = _data_cfg(latents, packing)
    tok = TextTokenizer(cfg.tokenizer_path)
    ds = LatentDataset(latents, tok, cfg.patch_size)
    planner = BatchPlanner([ds], [1.0], [vars(cfg.datasets[0].layouts)], cfg, tok)
    _, plans = planner.next_window()
    st = planner.state
    if packing and st["pending"]:
        from data_pipeline.packing import Sample
        plans.append({"index": st["mbs"], "row0": st["rows"], "T": cfg.row_tokens,
                      "rows": [[Sample.from_list(x) for x in r] for r in st["pending"]]})
    return cfg, [ds], plans


def test_packed_equals_unpacked_through_model(encoded, megatron_single):
    from test_model_parity import max_rel
    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.model.losses import FlowDraws, draw_flow_noise

    latents = encoded["multi"]
    pcfg, datasets, packed_plans = _plans(latents, packing=True)
    ucfg, _, unpacked_plans = _plans(latents, packing=False)
    packed_ids = Counter(_sample_id(s) for p in packed_plans for r in p["rows"] for s in r)
    unpacked_ids = Counter(_sample_id(s) for p in unpacked_plans for r in p["rows"] for s in r)
    assert packed_ids == unpacked_ids and sum(packed_ids.values()) == 14
    assert all(len(r) == 1 for p in unpacked_plans for r in p["rows"])
    assert max(len(r) for p in packed_plans for r in p["rows"]) >= 3       # real packing
    layouts = Counter(s[2] for s in packed_ids)
    assert layouts["tts"] and layouts["clone"] and layouts["continuation"] + layouts["clone_continuation"], layouts

    mcfg = load_model_preset("tiny", ["vocab_size=1280"])   # the demo tokenizer has 1,260 ids
    P, D, fl = mcfg.patch_size, mcfg.feat_dim, mcfg.flow
    assert (P, D) == (pcfg.patch_size, pcfg.latent_dim)
    packed = [MicroBatchAssembler(datasets, pcfg)[p] for p in packed_plans]
    unpacked = [MicroBatchAssembler(datasets, ucfg)[p] for p in unpacked_plans]

    # where each sample sits in the packed micro-batches, and the draws the model makes there
    where = {}
    for j, (plan, batch) in enumerate(zip(packed_plans, packed)):
        for b, row in enumerate(plan["rows"]):
            pos = 0
            for s in row:
                where[_sample_id(s)] = (j, b, pos)
                pos += s.length
    packed_draws = [draw_flow_noise(batch["row_seeds"], batch["text_tokens"].shape[1], P, D, fl.cfg_rate, fl.t_mu,
                                    fl.t_sigma) for batch in packed]
    unpacked_draws, dropped = [], 0
    for plan, batch in zip(unpacked_plans, unpacked):
        B, T = batch["text_tokens"].shape
        t, noise, keep = torch.full((B * T,), 0.5), torch.zeros(B * T, P, D), torch.ones(B * T)
        for r, (s,) in enumerate(plan["rows"]):
            j, b, pos = where[_sample_id(s)]
            L, Tp = s.length, packed[j]["text_tokens"].shape[1]
            # same sample, same content: every field of the packed segment equals the unpacked row
            for k in ("text_tokens", "text_mask", "audio_feats", "audio_mask", "loss_mask", "labels", "position_ids"):
                assert torch.equal(packed[j][k][b, pos:pos + L], batch[k][r, :L]), (k, s)
            assert not batch["audio_mask"][r, L:].any() and not batch["loss_mask"][r, L:].any()
            src, dst = slice(b * Tp + pos, b * Tp + pos + L), slice(r * T, r * T + L)
            d = packed_draws[j]
            t[dst], noise[dst], keep[dst] = d.t[src], d.noise[src], d.cfg_keep[src]
            dropped += int(((d.cfg_keep[src] == 0) & (batch["loss_mask"][r, :L] > 0)).sum())
        unpacked_draws.append(FlowDraws(t, noise, keep))
    assert dropped > 0, "exercise CFG dropout at loss positions"

    torch.manual_seed(0)
    model = VoxCPMModel(mcfg).train()

    def run(batches, draws):
        model.zero_grad(set_to_none=True)
        tot = {"diff_sum": 0.0, "stop_sum": 0.0, "num_loss_positions": 0.0}
        for batch, d in zip(batches, draws):
            out = model(batch, draws=d)
            (out["diff_sum"] + out["stop_sum"]).backward()
            tot = {k: tot[k] + out[k].detach().double() for k in tot}
        return tot, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    t0 = time.time()
    p_out, p_grads = run(packed, [None] * len(packed))          # the model draws from row_seeds itself
    u_out, u_grads = run(unpacked, unpacked_draws)
    elapsed = time.time() - t0

    n_loss = sum(int(b["loss_mask"].sum()) for b in unpacked)
    assert int(p_out["num_loss_positions"]) == int(u_out["num_loss_positions"]) == n_loss > 0
    loss_err = {k: max_rel(p_out[k], u_out[k]) for k in ("diff_sum", "stop_sum")}
    assert p_grads.keys() == u_grads.keys() and len(u_grads) == len(list(model.parameters()))
    grad_err = {n: max_rel(p_grads[n], u_grads[n]) for n in u_grads if u_grads[n].abs().max() > 0}
    assert len(grad_err) == len(u_grads), "every parameter gets a gradient"
    worst = max(grad_err, key=grad_err.get)
    shapes = [tuple(b["text_tokens"].shape) for b in packed], [tuple(b["text_tokens"].shape) for b in unpacked]
    print(f"\npacked {shapes[0]} vs unpacked {shapes[1]}: {n_loss} loss positions, layouts {dict(layouts)}, "
          f"{dropped} CFG drops; loss rel err {loss_err}; worst grad rel err {grad_err[worst]:.2e} ({worst}); "
          f"fwd+bwd {elapsed:.1f} s")
    assert max(loss_err.values()) < 1e-5, loss_err
    assert grad_err[worst] < 1e-4, (worst, grad_err[worst])
