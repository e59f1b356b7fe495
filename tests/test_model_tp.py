"""Tensor parallelism (2 processes, gloo, CPU), without and with sequence parallelism: the TP=2 model
loaded from the reference weights matches the reference losses and grads (gathered through the
converter) after megatron's own TP grad reduction (`_allreduce_non_tensor_model_parallel_grads`:
average for replicated params, sum for sequence-parallel ones); replicated params then hold
bit-identical grads on both ranks (the converter's gather checks it)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from test_model_parity import SEED, build_reference, max_rel, pack_row, make_sample, replay_reference_draws
from voxcpm_train.config.model import load_model_preset

TP = 2


def make_batch(cfg):
    gen = torch.Generator().manual_seed(8)
    P, D = cfg.patch_size, cfg.feat_dim
    rows = [pack_row([make_sample("clone", P, D, gen)], 20), pack_row([make_sample("tts", P, D, gen)], 20)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _worker(rank: int, port: int, out_path: str):
    from voxcpm_train.platform import setup_platform

    setup_platform("cpu")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    parallel_state.initialize_model_parallel(TP, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    from voxcpm_train.convert.mapping import ours_to_reference, reference_to_ours
    from voxcpm_train.model import VoxCPMModel

    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    cfg = load_model_preset("tiny")
    torch.manual_seed(0)
    ref = build_reference(cfg)  # same init on both ranks (same seed)
    batch = make_batch(cfg)
    B, T, P, D = batch["audio_feats"].shape
    draws = replay_reference_draws(SEED, B * T, P, D, cfg.flow.cfg_rate, cfg.flow.t_mu, cfg.flow.t_sigma)
    if rank == 0:
        torch.manual_seed(SEED)
        ref_out = ref(
            batch["text_tokens"], batch["text_mask"], batch["audio_feats"], batch["audio_mask"],
            batch["loss_mask"], batch["position_ids"], batch["labels"],
        )
        (ref_out["loss/diff"] + ref_out["loss/stop"]).backward()
        ref_grads = {k: p.grad for k, p in ref.named_parameters()}

    results = {}
    for sp in (False, True):
        model = VoxCPMModel(cfg, sequence_parallel=sp).train()
        model.load_state_dict(reference_to_ours(ref.state_dict(), cfg, tp_size=TP, tp_rank=rank), strict=True)
        out = model(batch, draws=draws)
        n = out["num_loss_positions"]
        diff, stop = out["diff_sum"] / n, out["stop_sum"] / n
        (diff + stop).backward()
        model.ddp_config = DistributedDataParallelConfig()  # what finalize_model_grads reads off a DDP chunk
        _allreduce_non_tensor_model_parallel_grads([model], model.config)
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        gathered = [None] * TP
        dist.all_gather_object(gathered, grads)
        unmarked = [
            name for name, p in model.named_parameters()
            if not any(getattr(p, a, False) for a in ("tensor_model_parallel", "average_gradients_across_tp_domain", "sequence_parallel"))
        ]
        if rank == 0:
            # ours_to_reference raises if a replicated tensor differs in any bit between the TP ranks.
            ours_ref = ours_to_reference([gathered], cfg)
            grad_err = {k: max_rel(ours_ref[k], ref_grads[k]) for k in ref_grads if ref_grads[k].abs().max() > 0}
            results[f"sp={sp}"] = {
                "diff": abs(float(diff) / float(ref_out["loss/diff"]) - 1),
                "stop": abs(float(stop) / float(ref_out["loss/stop"]) - 1),
                "grad": max(grad_err.values()),
                "grad_at": max(grad_err, key=grad_err.get),
                "n_grads": len(grad_err),
                "n_ref": len(ref_grads),
                "unmarked": unmarked,
                "tp_split_params": sum(1 for p in model.parameters() if getattr(p, "tensor_model_parallel", False)),
                "sp_params": sum(1 for p in model.parameters() if getattr(p, "sequence_parallel", False)),
            }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_matches_reference(tmp_path):
    from conftest import free_port

    out_path = tmp_path / "tp.json"
    mp.start_processes(_worker, args=(free_port(), str(out_path)), nprocs=TP, start_method="spawn")
    results = json.loads(out_path.read_text())
    for name, result in results.items():
        print(f"\nTP={TP} {name} vs reference: {result}")
        assert result["diff"] < 1e-5 and result["stop"] < 1e-5, result
        assert result["grad"] < 1e-4, result
        assert result["n_grads"] == result["n_ref"]
        assert result["unmarked"] == [] and result["tp_split_params"] > 0
    assert results["sp=False"]["sp_params"] == 0 and results["sp=True"]["sp_params"] > 0


def _local_recompute_worker(rank: int, port: int, out_path: str):
    """At TP=2 (with and without sequence parallelism) the LocEnc/LocDiT under full recompute give this
    rank the same loss and the same grad of every (local shard of a) parameter as without it."""
    import dataclasses

    from voxcpm_train.platform import setup_platform

    setup_platform("cpu")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    parallel_state.initialize_model_parallel(TP, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    from voxcpm_train.model import VoxCPMModel

    base = load_model_preset("tiny")
    batch = make_batch(base)
    batch["row_seeds"] = torch.tensor([3, 4])
    results = {}
    for sp in (False, True):
        runs = {}
        for recompute in (None, "full"):
            torch.manual_seed(0)
            model = VoxCPMModel(dataclasses.replace(base, recompute_local_granularity=recompute),
                                sequence_parallel=sp).train()
            out = model(batch)
            loss = (out["diff_sum"] + out["stop_sum"]) / out["num_loss_positions"]
            loss.backward()
            runs[recompute] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        (loss0, g0), (loss1, g1) = runs[None], runs["full"]
        results[f"sp={sp}"] = {
            "loss_equal": bool(torch.equal(loss0, loss1)),
            "same_names": sorted(g0) == sorted(g1),
            "grads_unequal": [n for n in g0 if g1.get(n) is None or not torch.equal(g0[n], g1[n])],
            "split_local_params": sum(1 for n, p in model.named_parameters() if n.startswith(("feat_encoder.", "feat_decoder."))
                                      and getattr(p, "tensor_model_parallel", False)),
        }
    gathered = [None] * TP
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_local_recompute_matches(tmp_path):
    from conftest import free_port

    out_path = tmp_path / "tp_recompute.json"
    mp.start_processes(_local_recompute_worker, args=(free_port(), str(out_path)), nprocs=TP, start_method="spawn")
    for rank, results in enumerate(json.loads(out_path.read_text())):
        for name, result in results.items():
            print(f"\nTP={TP} rank {rank} {name}, LocEnc/LocDiT recompute vs none: {result}")
            assert result["loss_equal"] and result["same_names"] and result["grads_unequal"] == [], (rank, name, result)
            assert result["split_local_params"] > 0      # the LocEnc/LocDiT linears are TP shards
