import dataclasses, torch
from test_model_parity import *
def test_bf16(megatron_single, tiny_cfg):
    from voxcpm_train.convert.mapping import reference_to_ours
    from voxcpm_train.model import VoxCPMModel
    cfg = dataclasses.replace(tiny_cfg, params_dtype="bfloat16")
    gen = torch.Generator().manual_seed(3)
    batch = stack_rows([pack_row([make_sample(k, cfg.patch_size, cfg.feat_dim, gen)], 16) for k in ("clone","tts")])
    torch.manual_seed(0)
    ref = build_reference(cfg)
    sd = ref.state_dict()
    ref32 = build_reference(cfg); ref32.load_state_dict(sd)
    ref = ref.to(torch.bfloat16); ref.config.dtype = "bfloat16"
    ours = VoxCPMModel(cfg).train()
    ours.load_state_dict(reference_to_ours({k: v.to(torch.bfloat16) for k, v in sd.items()}, cfg))
    B, T, P, D = batch["audio_feats"].shape
    res = {}
    for name, m in (("ref_bf16", ref), ("ref_fp32", ref32)):
        torch.manual_seed(SEED)
        o = m(batch["text_tokens"], batch["text_mask"], batch["audio_feats"], batch["audio_mask"], batch["loss_mask"], batch["position_ids"], batch["labels"])
        res[name] = (float(o["loss/diff"]), float(o["loss/stop"]))
    draws = replay_reference_draws(SEED, B * T, P, D, cfg.flow.cfg_rate, cfg.flow.t_mu, cfg.flow.t_sigma)
    o = ours(batch, draws=draws)
    n = o["num_loss_positions"]
    res["ours_bf16"] = (float(o["diff_sum"] / n), float(o["stop_sum"] / n))
    print(res)
