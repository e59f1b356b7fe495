"""Packed rows as cu_seqlens (THD): the boundaries, the SDPA backend's chunked attention against a dense
segment mask, and the whole model on packed micro-batches from the real loader (demo corpus encoded with
the tiny AudioVAE) against the earlier dense-mask path (`model.packed_seq_format=dense_mask`) with the
same weights: losses to 1e-6 relative, every gradient to 1e-5, at TP=1 here and at TP=2 (with and without
sequence parallelism) in `test_thd_equals_dense_tp2`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_model_parity import max_rel
from voxcpm_train.config.model import load_model_preset

REPO = Path(__file__).resolve().parents[1]
LOSS_TOL, GRAD_TOL = 1e-6, 1e-5


def test_segment_boundaries():
    from voxcpm_train.model.packed_seq import segment_boundaries, thd_packed_seq_params

    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    assert segment_boundaries(seg, 2, 6).tolist() == [0, 3, 5, 6, 7, 10, 12]
    assert segment_boundaries(None, 2, 6).tolist() == [0, 6, 12]
    p = thd_packed_seq_params(seg, 2, 6, "cpu")
    assert p.qkv_format == "thd" and p.max_seqlen_q == p.max_seqlen_kv == 3
    assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_q.tolist() == list(p.cu_seqlens_host)


def _dense_reference(q, k, v, seg, causal, scale):
    """Per-row SDPA with the dense segment mask: q [B, T, h, d] -> [B, T, h, d]."""
    import torch.nn.functional as F

    allowed = seg.unsqueeze(2) == seg.unsqueeze(1)
    if causal:
        allowed = allowed & torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=allowed.unsqueeze(1),
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["mixed", "one_per_row", "long_and_short"])
def test_packed_sdpa_matches_dense_mask(causal, layout):
    from voxcpm_train.model.attention import packed_sdpa
    from voxcpm_train.model.packed_seq import sdpa_chunk_plan, thd_packed_seq_params

    gen = torch.Generator().manual_seed(3)
    B, T, hq, hk, d = 2, 40, 4, 2, 8
    runs = {"mixed": [[7, 9, 20, 4], [13, 13, 10, 4]], "one_per_row": [[40], [40]],
            "long_and_short": [[30, 3, 3, 4], [2, 2, 2, 2, 32]]}[layout]
    seg = torch.tensor([[i for i, n in enumerate(row, 1) for _ in range(n)] for row in runs])
    if layout != "one_per_row":
        seg[0, -4:] = 0  # padding tail of row 0
    q = torch.randn(B, T, hq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, hk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, hk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = _dense_reference(q, k, v, seg, causal, 0.3)
    params = thd_packed_seq_params(seg, B, T, "cpu")
    out = packed_sdpa(*(x.reshape(B * T, x.shape[2], d) for x in (q, k, v)), params, causal, 0.3)
    assert out.shape == (B * T, hq * d)
    torch.testing.assert_close(out.view(B, T, hq, d), ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    plan = sdpa_chunk_plan(params, "cpu")
    t, C = B * T, plan.capacity
    assert C == params.max_seqlen_q and plan.chunks * C * C < 2 * t * C + C * C  # no [t, t] or [T, T] tile
    assert plan.one_per_chunk == (layout == "one_per_row")


# --------------------------------------------------------------------------------------------- #
# The model on loader batches
# --------------------------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def loader_batches(tmp_path_factory):
    """Three packed micro-batches (2 rows x 192 positions, several samples per row and padding) from the
    real loader on the demo corpus encoded with the tiny AudioVAE."""
    from data_pipeline.config import DataConfig, DatasetConfig
    from data_pipeline.encode import EncodeOptions, run_encode
    from data_pipeline.loader import VoxCPMDataLoader

    out = tmp_path_factory.mktemp("thd") / "latents"
    run_encode([str(REPO / "demo_data" / "emilia")], str(out), EncodeOptions(vae_config="tiny"))
    cfg = DataConfig(datasets=[DatasetConfig(name="demo", path=str(out))], tokenizer_path=str(REPO / "demo_data/tokenizer"),
                     row_tokens=192, rows_per_microbatch=2, window_samples=256, num_workers=0, seed=5)
    loader = VoxCPMDataLoader(cfg)
    batches = [next(loader) for _ in range(3)]
    assert any(int(b["segment_ids"].max()) >= 3 for b in batches) and any((b["segment_ids"] == 0).any() for b in batches)
    return batches


def _tiny(fmt: str):
    return dataclasses.replace(load_model_preset("tiny"), vocab_size=1280, packed_seq_format=fmt)


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    n = out["num_loss_positions"]
    (out["diff_sum"] / n + out["stop_sum"] / n).backward()
    losses = {k: float(out[k].detach() / n) for k in ("diff_sum", "stop_sum")}
    return losses, {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _compare(thd, dense):
    (lt, gt), (ld, gd) = thd, dense
    loss_err = {k: abs(lt[k] / ld[k] - 1) for k in ld}
    assert gt.keys() == gd.keys()
    grad_err = {n: max_rel(gt[n], gd[n]) for n in gd if gd[n].abs().max() > 0}
    return loss_err, grad_err


def test_thd_equals_dense_on_loader_batches(megatron_single, loader_batches):
    from voxcpm_train.model import VoxCPMModel

    torch.manual_seed(0)
    dense = VoxCPMModel(_tiny("dense_mask")).train()
    thd = VoxCPMModel(_tiny("thd")).train()
    thd.load_state_dict(dense.state_dict())
    for batch in loader_batches:
        loss_err, grad_err = _compare(_step(thd, batch), _step(dense, batch))
        worst = max(grad_err, key=grad_err.get)
        print(f"\nTHD vs dense: loss rel err {loss_err}; worst grad rel err {grad_err[worst]:.1e} ({worst})")
        assert max(loss_err.values()) < LOSS_TOL, loss_err
        assert grad_err[worst] < GRAD_TOL, (worst, grad_err[worst])
        assert len(grad_err) == len(list(dense.parameters()))  # every parameter has a nonzero grad


def _tp_worker(rank: int, port: int, batches_path: str, out_path: str):
    from voxcpm_train.platform import setup_platform

    setup_platform("cpu")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
    from safetensors.torch import load_file

    from voxcpm_train.model import VoxCPMModel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(2, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    flat = load_file(batches_path)
    n = 1 + max(int(k.split(".")[0]) for k in flat)
    batches = [{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(f"{i}.")} for i in range(n)]

    def step(model, batch):
        model.zero_grad(set_to_none=True)
        out = model(batch)
        m = out["num_loss_positions"]
        (out["diff_sum"] / m + out["stop_sum"] / m).backward()
        model.ddp_config = DistributedDataParallelConfig()  # what finalize_model_grads reads off a DDP chunk
        _allreduce_non_tensor_model_parallel_grads([model], model.config)
        return ({k: float(out[k].detach() / m) for k in ("diff_sum", "stop_sum")},
                {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})

    torch.manual_seed(0)
    dense = VoxCPMModel(_tiny("dense_mask")).train()
    results = {}
    for sp in (False, True):
        thd = VoxCPMModel(_tiny("thd"), sequence_parallel=sp).train()
        thd.load_state_dict(dense.state_dict())
        worst_loss, worst_grad = 0.0, 0.0
        for batch in batches:
            loss_err, grad_err = _compare(step(thd, batch), step(dense, batch))
            worst_loss = max(worst_loss, *loss_err.values())
            worst_grad = max(worst_grad, *grad_err.values())
        results[f"sp={sp}"] = {"loss": worst_loss, "grad": worst_grad, "n_grads": len(grad_err),
                               "n_params": len(list(dense.parameters())), "sp_active": thd.config.sequence_parallel}
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_thd_equals_dense_tp2(loader_batches, tmp_path):
    """TP=2 (gloo, 2 processes): THD, with and without sequence parallelism, against the dense-mask path
    at TP=2, on the same loader micro-batches; every rank's losses and (TP-reduced) grads."""
    from safetensors.torch import save_file

    from conftest import free_port

    batches_path, out_path = tmp_path / "batches.safetensors", tmp_path / "tp.json"
    save_file({f"{i}.{k}": v.contiguous() for i, b in enumerate(loader_batches) for k, v in b.items()}, str(batches_path))
    mp.start_processes(_tp_worker, args=(free_port(), str(batches_path), str(out_path)), nprocs=2, start_method="spawn")
    per_rank = json.loads(out_path.read_text())
    for rank, results in enumerate(per_rank):
        for name, r in results.items():
            print(f"\nTP=2 rank {rank} THD {name} vs dense: {r}")
            assert r["loss"] < LOSS_TOL and r["grad"] < GRAD_TOL and r["n_grads"] == r["n_params"], (rank, name, r)
            assert r["sp_active"] == (name == "sp=True")
