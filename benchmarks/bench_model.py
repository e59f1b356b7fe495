"""Forward+backward time of our megatron-core `VoxCPMModel` vs the reference `voxcpm` `VoxCPM2Model`
(fp32, CPU, one process, pinned threads) on the same weights, the same batch and the same draws.

    .venv/bin/python benchmarks/bench_model.py                      # tiny and mid, 15 steps each
    .venv/bin/python benchmarks/bench_model.py --configs tiny --repeats 30 --profile

Configs: `tiny` = configs/model/tiny.yaml with a TTS batch of B=4 rows x 96 positions (DESIGN §8's
reference tiny timing); `mid` = hidden 512 / ffn 1536 / 8 heads (2 KV groups), TSLM 4 + RALM 2 layers,
LocEnc/LocDiT hidden 256 (8 heads x 64 = q width 512) with 2 layers, P=4, B=2 x 256.

The batch: one TTS sample `[text..., 101, audio x A, 102]` per row, right-padded to T (the reference
trainer's padded batch; the reference has no packing). Our model gets `segment_ids` (1 on the sample,
0 on padding) as the data pipeline gives them, unless `--no-segments`.
Draws: the reference draws from the global RNG inside its forward; the benchmark seeds it before
every reference step and replays the same draws into a `FlowDraws` injected into our model (so our
per-row draw cost is not timed). The losses of both models are checked to agree before timing.

One step = zero grads, forward, (diff + stop).backward(). Steps of the two models alternate
(ref, ours, ref, ours, ...) so that load changes on a shared machine hit both alike. Reported: median
ms/step, min-max spread, ours/reference ratio of the medians (and of the minima, the steadier figure on
a loaded machine), positions/s = B*T / median (padding included, as in DESIGN §8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from voxcpm_train.platform import setup_platform  # noqa: E402

setup_platform("cpu" if not torch.cuda.is_available() else "auto")  # before megatron is imported

from voxcpm_train.config.model import load_model_preset, to_reference_config  # noqa: E402

SEED = 777

MID_OVERRIDES = [
    "vocab_size=1024",
    "lm.hidden_size=512", "lm.ffn_hidden_size=1536", "lm.num_layers=4",
    "lm.num_attention_heads=8", "lm.num_query_groups=2",
    "residual_lm_num_layers=2",
    "encoder.hidden_size=256", "encoder.ffn_hidden_size=768", "encoder.num_layers=2",
    "encoder.num_attention_heads=8", "encoder.num_query_groups=2", "encoder.kv_channels=64",
    "dit.hidden_size=256", "dit.ffn_hidden_size=768", "dit.num_layers=2",
    "dit.num_attention_heads=8", "dit.num_query_groups=2", "dit.kv_channels=64",
    "fsq_latent_dim=64",
    # head dim 64 -> 32 LongRoPE factors
    "rope.short_factor=[" + ",".join(f"{1.0 + 0.1 * i:.1f}" for i in range(32)) + "]",
    "rope.long_factor=[" + ",".join(f"{1.0 + 0.1 * i:.1f}" for i in range(32)) + "]",
]

CONFIGS = {
    # name: (preset overrides, B, T)
    "tiny": ([], 4, 96),
    "mid": (MID_OVERRIDES, 2, 256),
}


# --------------------------------------------------------------------------------------------- #
# Models, batch, draws
# --------------------------------------------------------------------------------------------- #


def build_reference(cfg):
    """Reference `VoxCPM2Model` (its own random init), fp32, CPU, train mode, without its AudioVAE."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaTokenizerFast
    from voxcpm.model.voxcpm2 import VoxCPM2Model, VoxCPMConfig
    from voxcpm.modules.audiovae import AudioVAEConfigV2, AudioVAEV2

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, cfg.vocab_size)}}
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>",
    )
    ref_json = dict(to_reference_config(cfg, dtype="float32"), device="cpu")
    vae = AudioVAEV2(AudioVAEConfigV2(
        encoder_dim=4, encoder_rates=[2, 2], latent_dim=cfg.feat_dim, decoder_dim=8, decoder_rates=[2, 2],
        sr_bin_boundaries=None, cond_dim=8,
    ))
    model = VoxCPM2Model(VoxCPMConfig.model_validate(ref_json), tokenizer, vae, device="cpu")
    del model.audio_vae  # not used by the training forward
    return model.float().train()


def tts_batch(cfg, B: int, T: int, seed: int = 3, segments: bool = True) -> dict:
    """B rows, each one TTS sample `[text x n, 101, audio x A, 102]` right-padded to T positions;
    text ~ 20-30 % of the row, 0-8 % padding. Loss and stop label on the A target patches."""
    gen = torch.Generator().manual_seed(seed)
    P, D = cfg.patch_size, cfg.feat_dim
    keys = ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels", "position_ids", "segment_ids")
    out = {k: torch.zeros(B, T, dtype=torch.float32 if "mask" in k else torch.long) for k in keys}
    out["audio_feats"] = torch.zeros(B, T, P, D)
    for b in range(B):
        n_text = int(T * (0.2 + 0.1 * torch.rand(1, generator=gen)))
        n_pad = int(T * 0.08 * torch.rand(1, generator=gen))
        n_audio = T - n_pad - n_text - 2
        length = n_text + n_audio + 2
        a0, a1 = n_text + 1, n_text + 1 + n_audio  # target audio positions [a0, a1)
        out["text_tokens"][b, :n_text] = torch.randint(5, min(cfg.vocab_size, 100), (n_text,), generator=gen)
        out["text_tokens"][b, n_text] = 101
        out["text_tokens"][b, a1] = 102
        out["text_mask"][b, : a0] = 1.0
        out["text_mask"][b, a1] = 1.0
        out["audio_mask"][b, a0:a1] = 1.0
        out["loss_mask"][b, a0:a1] = 1.0
        out["labels"][b, a1 - 1] = 1
        out["audio_feats"][b, a0:a1] = torch.randn(n_audio, P, D, generator=gen)
        out["position_ids"][b, :length] = torch.arange(length)
        out["segment_ids"][b, :length] = 1
    if not segments:
        del out["segment_ids"]
    out["row_seeds"] = torch.arange(B)
    return out


def replay_reference_draws(seed: int, n: int, patch: int, dim: int, cfg_rate: float, t_mu: float, t_sigma: float):
    """The draws the reference's `UnifiedCFM.compute_loss` makes from the global RNG after
    `torch.manual_seed(seed)` (order: cfg keep, noisy-cond mask, noisy-cond noise, s_r, s_t, r!=t
    mask, z), as our `FlowDraws`."""
    from voxcpm_train.model.losses import FlowDraws

    torch.manual_seed(seed)
    keep = (torch.rand(n) > cfg_rate).float()
    torch.rand(n)
    torch.randn(n, dim, patch)
    torch.randn(n)
    t = torch.sigmoid(torch.randn(n) * t_sigma + t_mu)
    torch.rand(n)
    z = torch.randn(n, dim, patch)
    return FlowDraws(t=t, noise=z.transpose(1, 2).contiguous(), cfg_keep=keep)


def init_megatron_single() -> None:
    from voxcpm_train.platform import init_single_process

    init_single_process()


# --------------------------------------------------------------------------------------------- #
# Steps
# --------------------------------------------------------------------------------------------- #


def make_steps(cfg, batch):
    """(ref_step, ours_step, check): each step runs zero-grad + forward + backward and returns the
    (diff, stop) losses as floats."""
    from voxcpm_train.convert.mapping import reference_to_ours
    from voxcpm_train.model import VoxCPMModel

    torch.manual_seed(0)
    ref = build_reference(cfg)
    ours = VoxCPMModel(cfg).train()
    missing, unexpected = ours.load_state_dict(reference_to_ours(dict(ref.state_dict()), cfg), strict=True)
    assert not missing and not unexpected
    B, T, P, D = batch["audio_feats"].shape
    draws = replay_reference_draws(SEED, B * T, P, D, cfg.flow.cfg_rate, cfg.flow.t_mu, cfg.flow.t_sigma)
    ref_args = [batch[k] for k in ("text_tokens", "text_mask", "audio_feats", "audio_mask", "loss_mask", "position_ids", "labels")]

    def ref_step():
        ref.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)
        out = ref(*ref_args)
        loss = out["loss/diff"] + out["loss/stop"]
        loss.backward()
        return float(out["loss/diff"].detach()), float(out["loss/stop"].detach())

    def ours_step():
        ours.zero_grad(set_to_none=True)
        out = ours(batch, draws=draws)
        n = out["num_loss_positions"]
        diff, stop = out["diff_sum"] / n, out["stop_sum"] / n
        (diff + stop).backward()
        return float(diff.detach()), float(stop.detach())

    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    return ref_step, ours_step, (n_ref, n_ours)


def summarize(times):
    ms = sorted(1000 * t for t in times)
    return {"median": statistics.median(ms), "min": ms[0], "max": ms[-1],
            "p25": ms[len(ms) // 4], "p75": ms[(3 * len(ms)) // 4]}


def bench_config(name, args):
    overrides, B, T = CONFIGS[name]
    cfg = load_model_preset("tiny", overrides)
    batch = tts_batch(cfg, B, T, segments=not args.no_segments)
    ref_step, ours_step, (n_ref, n_ours) = make_steps(cfg, batch)
    # Same weights, batch and draws: the losses must agree before the timings mean anything.
    (rd, rs), (od, os_) = ref_step(), ours_step()
    rel = max(abs(od - rd) / abs(rd), abs(os_ - rs) / abs(rs))
    if rel > 1e-4:
        raise SystemExit(f"{name}: losses disagree (ref diff {rd} stop {rs}, ours diff {od} stop {os_})")
    for _ in range(args.warmup):
        ref_step()
        ours_step()
    times = {"ref": [], "ours": []}
    for _ in range(args.repeats):
        for key, step in (("ref", ref_step), ("ours", ours_step)):
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    result = {
        "config": name, "B": B, "T": T, "params_ref": n_ref, "params_ours": n_ours,
        "loss_positions": int(batch["loss_mask"].sum()), "loss_rel_err": rel,
        "ref": summarize(times["ref"]), "ours": summarize(times["ours"]),
    }
    result["ratio"] = result["ours"]["median"] / result["ref"]["median"]
    result["ratio_min"] = result["ours"]["min"] / result["ref"]["min"]
    for key in ("ref", "ours"):
        result[key]["positions_per_s"] = B * T / (result[key]["median"] / 1000)
    if args.profile:
        result["profile"] = {key: profile(step, args.profile_rows) for key, step in (("ref", ref_step), ("ours", ours_step))}
    return result


def profile(step, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-segments", action="store_true", help="do not give our model segment_ids (causal SDPA, no mask)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops (self CPU time, 3 steps)")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    init_megatron_single()
    load_before = os.getloadavg()
    results = [bench_config(name, args) for name in args.configs]
    load_after = os.getloadavg()

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"threads {torch.get_num_threads()}, load avg before {load_before[0]:.2f} after {load_after[0]:.2f}, "
          f"segments {'off' if args.no_segments else 'on'}, {args.repeats} steps after {args.warmup} warm-up")
    print("| config | B x T | loss pos. | reference ms/step (min-max) | ours ms/step (min-max) | ours/ref median (min) "
          "| ref pos/s | ours pos/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ref, ours = r["ref"], r["ours"]
        print(f"| {r['config']} | {r['B']}x{r['T']} | {r['loss_positions']} | {ref['median']:.1f} ({ref['min']:.1f}-{ref['max']:.1f}) "
              f"| {ours['median']:.1f} ({ours['min']:.1f}-{ours['max']:.1f}) | {r['ratio']:.2f} ({r['ratio_min']:.2f}) "
              f"| {ref['positions_per_s']:,.0f} | {ours['positions_per_s']:,.0f} |")
    for r in results:
        for key, table in r.get("profile", {}).items():
            print(f"\n## {r['config']} {key}: top ops by self CPU time (3 steps)\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"load_before": load_before, "load_after": load_after, "results": results}, indent=1))


if __name__ == "__main__":
    main()
