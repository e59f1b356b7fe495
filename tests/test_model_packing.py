"""Packed rows: two samples in one row (segment-masked attention, per-sample positions, shift-right
and `cond` reset at the segment start) give the same summed losses and grads as the two samples in
separate rows. Draws are made per sample and laid out for each batch shape, so both see the same
t, noise and CFG keep at every sample position."""

from __future__ import annotations

import torch

from test_model_parity import make_sample, max_rel, pack_row
from voxcpm_train.config.model import load_model_preset


def sample_draws(sample, seed, cfg):
    from voxcpm_train.model.losses import draw_flow_noise

    n, P, D = sample["audio_feats"].shape
    return draw_flow_noise(torch.tensor([seed]), n, P, D, 0.5, cfg.flow.t_mu, cfg.flow.t_sigma)


def layout_draws(rows_of_draws, T, P, D):
    """Concatenate per-sample draws row by row, padding each row to T positions."""
    from voxcpm_train.model.losses import FlowDraws

    t, noise, keep = [], [], []
    for row in rows_of_draws:
        n = sum(len(d.t) for d in row)
        t += [d.t for d in row] + [torch.full((T - n,), 0.5)]
        noise += [d.noise for d in row] + [torch.zeros(T - n, P, D)]
        keep += [d.cfg_keep for d in row] + [torch.ones(T - n)]
    return FlowDraws(torch.cat(t), torch.cat(noise), torch.cat(keep))


def run(model, batch, draws):
    model.zero_grad(set_to_none=True)
    out = model(batch, draws=draws)
    (out["diff_sum"] + out["stop_sum"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads


def test_packed_row_equals_separate_rows(megatron_single):
    from voxcpm_train.model import VoxCPMModel

    cfg = load_model_preset("tiny")
    torch.manual_seed(0)
    model = VoxCPMModel(cfg).train()
    gen = torch.Generator().manual_seed(11)
    P, D = cfg.patch_size, cfg.feat_dim
    a, b = make_sample("clone", P, D, gen), make_sample("tts", P, D, gen)
    da, db = sample_draws(a, 1, cfg), sample_draws(b, 2, cfg)
    assert da.cfg_keep.min() == 0 or db.cfg_keep.min() == 0, "exercise CFG dropout"

    T_packed = len(a["text_tokens"]) + len(b["text_tokens"]) + 3
    packed = {k: v.unsqueeze(0) for k, v in pack_row([a, b], T_packed).items()}
    packed_out, packed_grads = run(model, packed, layout_draws([[da, db]], T_packed, P, D))

    T_sep = max(len(a["text_tokens"]), len(b["text_tokens"])) + 2
    rows = [pack_row([a], T_sep), pack_row([b], T_sep)]
    separate = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    sep_out, sep_grads = run(model, separate, layout_draws([[da], [db]], T_sep, P, D))

    assert packed_out["num_loss_positions"] == sep_out["num_loss_positions"] == 9
    loss_err = {k: max_rel(packed_out[k], sep_out[k]) for k in ("diff_sum", "stop_sum")}
    grad_err = {n: max_rel(packed_grads[n], sep_grads[n]) for n in sep_grads if sep_grads[n].abs().max() > 0}
    worst = max(grad_err, key=grad_err.get)
    print(f"\npacked vs separate: loss rel err {loss_err}; worst grad rel err {grad_err[worst]:.2e} ({worst})")
    assert max(loss_err.values()) < 1e-5, loss_err
    assert grad_err[worst] < 1e-5, (worst, grad_err[worst])
    assert len(grad_err) == len(sep_grads)


def test_packing_isolates_samples(megatron_single):
    """With b packed before a, changing b's content leaves a's losses bit-identical (attention, the
    shift-right and the cond patch stop at the segment start); without segment ids they change."""
    from voxcpm_train.model import VoxCPMModel

    cfg = load_model_preset("tiny")
    torch.manual_seed(0)
    model = VoxCPMModel(cfg).eval()
    gen = torch.Generator().manual_seed(5)
    P, D = cfg.patch_size, cfg.feat_dim
    a, b = make_sample("tts", P, D, gen), make_sample("clone", P, D, gen)
    b2 = dict(b, audio_feats=torch.randn(b["audio_feats"].shape, generator=gen))
    b2["text_tokens"] = torch.where(b["text_mask"] > 0, (b["text_tokens"] + 7) % 90 + 5, b["text_tokens"])
    T = len(a["text_tokens"]) + len(b["text_tokens"])
    draws = layout_draws([[sample_draws(b, 2, cfg), sample_draws(a, 1, cfg)]], T, P, D)
    losses = {True: [], False: []}
    for other in (b, b2):
        row = {k: v.unsqueeze(0) for k, v in pack_row([other, a], T).items()}
        row["loss_mask"][:, : len(b["text_tokens"])] = 0  # losses of a only
        for segmented in (True, False):
            batch = dict(row) if segmented else {k: v for k, v in row.items() if k not in ("segment_ids", "position_ids")}
            out = model(batch, draws=draws)
            losses[segmented].append(torch.stack([out["diff_sum"], out["stop_sum"]]))
    assert torch.equal(losses[True][0], losses[True][1])
    assert not torch.allclose(losses[False][0], losses[False][1])
