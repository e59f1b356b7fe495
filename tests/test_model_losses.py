"""Building blocks: flow-matching draws, FSQ straight-through, segment-aware shift-right and masks,
loss reduction, and a micro-batch without loss positions."""

from __future__ import annotations

import torch

from voxcpm_train.config.model import load_model_preset


def test_draws_depend_only_on_row_seed():
    from voxcpm_train.model.losses import draw_flow_noise

    both = draw_flow_noise(torch.tensor([7, 9]), 50, 4, 8, cfg_rate=0.1)
    alone = draw_flow_noise(torch.tensor([9]), 50, 4, 8, cfg_rate=0.1)
    assert torch.equal(both.t[50:], alone.t) and torch.equal(both.noise[50:], alone.noise)
    assert torch.equal(both.cfg_keep[50:], alone.cfg_keep)
    assert not torch.equal(both.t[:50], alone.t)
    big = draw_flow_noise(torch.arange(40), 500, 1, 1, cfg_rate=0.1, t_mu=-0.4, t_sigma=1.0)
    assert big.t.shape == (20000,) and big.noise.shape == (20000, 1, 1)
    assert abs(float(1 - big.cfg_keep.mean()) - 0.1) < 0.01  # CFG drop rate
    assert abs(float(torch.logit(big.t).mean()) + 0.4) < 0.03  # logit-normal t
    assert abs(float(torch.logit(big.t).std()) - 1.0) < 0.03


def test_fsq_straight_through(megatron_single):
    from voxcpm_train.model.fsq import FSQ

    fsq = FSQ(16, 4, 9)
    x = torch.randn(3, 16, requires_grad=True)
    fsq.train()
    y = fsq(x)
    latent = torch.tanh(fsq.in_proj(x))
    expected = fsq.out_proj(torch.round(latent * 9) / 9)
    assert torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and fsq.in_proj.weight.grad.abs().sum() > 0  # gradient passes the rounding
    fsq.eval()
    assert torch.allclose(fsq(x), expected, atol=1e-6)


def test_shift_right_and_mask_respect_segments(megatron_single):
    from voxcpm_train.model.voxcpm import segment_attention_mask, shift_right

    x = torch.arange(1, 7, dtype=torch.float32).view(1, 6, 1)
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    assert shift_right(x, seg).flatten().tolist() == [0, 1, 2, 0, 4, 0]
    assert shift_right(x, None).flatten().tolist() == [0, 1, 2, 3, 4, 5]
    blocked = segment_attention_mask(seg, causal=True)[0, 0]
    allowed = (~blocked).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_loss_free_micro_batch(megatron_single):
    """A micro-batch with no loss positions (prompt-only samples) gives zero losses and zero grads."""
    from voxcpm_train.model import VoxCPMModel, combine_losses

    cfg = load_model_preset("tiny")
    model = VoxCPMModel(cfg).train()
    B, T = 1, 6
    batch = {
        "text_tokens": torch.tensor([[103, 0, 0, 104, 0, 0]]),
        "text_mask": torch.tensor([[1.0, 0, 0, 1, 0, 0]]),
        "audio_feats": torch.randn(B, T, cfg.patch_size, cfg.feat_dim),
        "audio_mask": torch.tensor([[0.0, 1, 1, 0, 0, 0]]),
        "loss_mask": torch.zeros(B, T),
        "labels": torch.zeros(B, T, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 0]]),
        "segment_ids": torch.tensor([[1, 1, 1, 1, 0, 0]]),
        "row_seeds": torch.tensor([3]),
    }
    out = model(batch)
    assert float(out["num_loss_positions"]) == 0 and float(out["diff_sum"]) == 0 and float(out["stop_sum"]) == 0
    loss = combine_losses(out, cfg.lambda_diff, cfg.lambda_stop)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in model.parameters())


def test_activation_recompute_matches(megatron_single):
    """Full (uniform, block) and selective recompute of the TSLM/RALM give the same losses and grads."""
    import dataclasses

    from test_model_parity import make_sample, pack_row
    from voxcpm_train.model import VoxCPMModel

    base = load_model_preset("tiny")
    gen = torch.Generator().manual_seed(4)
    rows = [pack_row([make_sample("clone", base.patch_size, base.feat_dim, gen)], 20)] * 2
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["row_seeds"] = torch.tensor([1, 2])
    results = []
    for changes in ({}, {"recompute_granularity": "full"}, {"recompute_granularity": "full", "recompute_method": "block"},
                    {"recompute_granularity": "selective"}):
        cfg = dataclasses.replace(base, **changes)
        torch.manual_seed(0)
        model = VoxCPMModel(cfg).train()
        out = model(batch)
        (out["diff_sum"] + out["stop_sum"]).backward()
        results.append((out["diff_sum"].detach(), {n: p.grad for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        for name, grad in grads.items():
            assert torch.allclose(grad, results[0][1][name], rtol=1e-6, atol=1e-9), name


def _local_recompute_run(cfg, batch):
    """(loss, every parameter's grad) of one fp32 forward/backward of a fresh `cfg` model (seed 0)."""
    from voxcpm_train.model import VoxCPMModel

    torch.manual_seed(0)
    model = VoxCPMModel(cfg).train()
    out = model(batch)
    loss = out["diff_sum"] + out["stop_sum"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_local_recompute_matches(megatron_single):
    """megatron's full recompute of the LocEnc/LocDiT layers (`model.recompute_local_granularity=full`),
    alone and with full recompute of the TSLM/RALM, gives bit-identical losses and grads on a packed batch
    (several samples per row, a padding tail), fp32. The layers really run under megatron's checkpoint."""
    import dataclasses

    from megatron.core import tensor_parallel

    from test_model_parity import make_sample, pack_row, stack_rows

    base = load_model_preset("tiny")
    gen = torch.Generator().manual_seed(6)
    rows = [pack_row([make_sample(kind, base.patch_size, base.feat_dim, gen) for kind in kinds], 40)
            for kinds in (("clone", "tts", "tts"), ("tts", "clone"))]
    batch = stack_rows(rows)
    batch["row_seeds"] = torch.tensor([5, 6])
    assert int(batch["segment_ids"].max()) == 3 and bool((batch["segment_ids"] == 0).any())   # packed, padded
    want_loss, want = _local_recompute_run(base, batch)
    calls = []
    original = tensor_parallel.checkpoint
    tensor_parallel.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for changes in ({"recompute_local_granularity": "full"},
                        {"recompute_local_granularity": "full", "recompute_granularity": "full"}):
            calls.clear()
            loss, grads = _local_recompute_run(dataclasses.replace(base, **changes), batch)
            lm = base.lm.num_layers + base.residual_lm_num_layers if "recompute_granularity" in changes else 0
            assert len(calls) == base.encoder.num_layers + base.dit.num_layers + lm   # one checkpoint per layer
            assert torch.equal(loss, want_loss), changes
            assert grads.keys() == want.keys()
            for name, grad in grads.items():
                assert grad is not None and torch.equal(grad, want[name]), (changes, name)
    finally:
        tensor_parallel.checkpoint = original


def test_bad_micro_batch_names_the_field(megatron_single):
    import pytest

    from voxcpm_train.model import VoxCPMModel

    cfg = load_model_preset("tiny")
    model = VoxCPMModel(cfg)
    B, T = 1, 4
    batch = {
        "text_tokens": torch.zeros(B, T, dtype=torch.long), "text_mask": torch.ones(B, T),
        "audio_feats": torch.zeros(B, T, cfg.patch_size, 32), "audio_mask": torch.zeros(B, T),
        "loss_mask": torch.zeros(B, T), "labels": torch.zeros(B, T, dtype=torch.long), "row_seeds": torch.tensor([0]),
    }
    with pytest.raises(ValueError, match=r"audio_feats has shape \(1, 4, 4, 32\), expected \[B, T, model.patch_size, model.feat_dim\]"):
        model(batch)
    batch["audio_feats"] = torch.zeros(B, T, cfg.patch_size, cfg.feat_dim)
    with pytest.raises(ValueError, match=r"lacks \['row_seeds'\]"):
        model({k: v for k, v in batch.items() if k != "row_seeds"})
    with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 3\)"):
        model(dict(batch, segment_ids=torch.ones(1, 3, dtype=torch.long)))
