"""`training/flops.py` against torch's `FlopCounterMode` on the tiny model's forward (SDPA math backend, so
attention runs as counted bmm's): the matmul FLOPs agree exactly on a packed micro-batch (LocEnc at audio
positions, LocDiT and stop head at loss positions, TSLM/RALM at every position, padding included); the
bidirectional LocEnc/LocDiT attention agrees exactly; the causal TSLM/RALM attention is half of torch's
count (torch counts the full square, flops.py the causal triangle), on rows of one sample each."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from test_model_parity import make_sample, pack_row
from voxcpm_train.config.model import load_model_preset

aten = torch.ops.aten


def _count(model, batch):
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)
    by_module = counter.get_flop_counts()
    glob = by_module["Global"]
    linear = glob.get(aten.mm, 0) + glob.get(aten.addmm, 0)
    attention = {name: counts.get(aten.bmm, 0) for name, counts in by_module.items()}
    return linear, glob.get(aten.bmm, 0), attention


def _batch(rows, T):
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["row_seeds"] = torch.arange(len(rows))
    return batch


@pytest.mark.parametrize("arch", ["voxcpm2", "voxcpm"])
def test_forward_flops_match_flop_counter(megatron_single, arch):
    import dataclasses

    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.training.flops import BatchShape, forward_flops

    cfg = dataclasses.replace(load_model_preset("tiny"), architecture=arch)
    torch.manual_seed(0)
    model = VoxCPMModel(cfg).eval()
    gen = torch.Generator().manual_seed(2)
    P, D = cfg.patch_size, cfg.feat_dim
    rows = [pack_row([make_sample("clone", P, D, gen), make_sample("tts", P, D, gen)], 34),
            pack_row([make_sample("tts", P, D, gen), make_sample("tts", P, D, gen)], 34)]
    batch = _batch(rows, 34)
    linear, _, attention = _count(model, batch)
    ours = forward_flops(cfg, BatchShape.of_batch(batch, include_padding=True))
    matmuls = ours["lm"] + ours["encoder"] + ours["dit"] + ours["projections"]
    print(f"\n{arch}: torch mm/addmm {linear}, flops.py {matmuls}; parts {ours}")
    assert linear == matmuls
    assert attention["VoxCPMModel.feat_encoder"] == ours["encoder_attention"]
    assert attention["VoxCPMModel.feat_decoder.estimator"] == ours["dit_attention"]

    # causal stacks: rows of one sample each (no padding): torch counts T², flops.py T²/2
    one = [pack_row([make_sample(kind, P, D, gen)], n) for kind, n in (("clone", 14), ("clone", 14))]
    batch = _batch(one, 14)
    _, _, attention = _count(model, batch)
    ours = forward_flops(cfg, BatchShape.of_batch(batch))
    lm_torch = attention["VoxCPMModel.base_lm"] + attention["VoxCPMModel.residual_lm"]
    assert lm_torch == 2 * ours["lm_attention"] > 0


def test_batch_shape_and_training_flops():
    from voxcpm_train.training.flops import BatchShape, flops_per_position, forward_flops, training_flops

    cfg = load_model_preset("voxcpm2_2b")
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    batch = {"text_mask": torch.zeros(2, 6), "segment_ids": seg, "audio_mask": torch.ones(2, 6),
             "loss_mask": torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.float32)}
    useful = BatchShape.of_batch(batch)
    assert useful == BatchShape(positions=11, audio_positions=12, loss_positions=7, sequence_lengths=(3, 2, 6))
    assert BatchShape.of_batch(batch, include_padding=True).sequence_lengths == (3, 2, 1, 6)
    assert training_flops(cfg, useful) == 3 * forward_flops(cfg, useful)["total"]
    # VoxCPM2-2B, one 8192-position sample per row, every position through LocEnc and LocDiT: the layer
    # GEMMs alone are 6 x (36 TSLM/RALM layers x 47,185,920 weights + 12 layers x 17,301,504 weights x
    # (5 LocEnc + 11 LocDiT tokens)); attention and the projections add less than 15 %
    gemms = 6 * (36 * 47_185_920 + 12 * 17_301_504 * (5 + 11))
    per_pos = flops_per_position(cfg, 8192)
    assert gemms < per_pos < 1.15 * gemms, (per_pos, gemms)
    assert flops_per_position(cfg, 8192, audio_fraction=0.7, loss_fraction=0.6, sequence_length=128) < per_pos
