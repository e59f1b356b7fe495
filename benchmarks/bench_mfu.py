"""MFU of `voxcpm-train` training steps on one device, and the official trainer's samples/s on the same one.

    python benchmarks/bench_mfu.py                       # CUDA: VoxCPM2-2B, every config below (< 8 min, H100/H200)
    python benchmarks/bench_mfu.py --configs te_bf16_8k te_fp8_8k --steps 30
    python benchmarks/bench_mfu.py --tiny                # the CPU smoke run (the default without CUDA)

Ours: VoxCPM2-2B (`configs/model/voxcpm2_2b.yaml`, random weights, nothing downloaded), built and stepped by
the project's own runtime (`voxcpm_train.parallel`: megatron DDP, distributed optimizer with fp32 main
weights, bf16 params, `train_step` = the schedule's forward/backward over the micro-batches + clip + Adam),
on packed micro-batches of a realistic mix (half TTS `[text, 101, audio, 102]`, half reference clone
`[103, ref, 104, text, 101, audio, 102]`; text 8-60 ids, target 2-15 s, reference 2-8 s at 6.25 positions/s)
packed first-fit into rows of T positions (T = 4096 and 8192). Configs (name: layers / attention /
precision / T):

    sdpa_bf16_4k   local megatron linears, torch SDPA (THD chunks),   bf16, T 4096
    te_bf16_4k     Transformer Engine spec, TE attention (THD),       bf16, T 4096
    te_bf16_8k     Transformer Engine spec, TE attention (THD),       bf16, T 8192
    te_fp8_8k      as te_bf16_8k, FP8 hybrid, delayed scaling (TSLM/RALM GEMMs)
    te_fp8cs_8k    as te_bf16_8k, FP8 hybrid, current (per-tensor) scaling
    official_bf16  the official `voxcpm` fine-tuner's step (padded rows, AudioVAE encode in the step,
                   fp32 weights under bf16 autocast, AdamW), same length mix

Every config of ours runs 8192 positions per micro-batch (`--rows` x T). Activation recompute (`--recompute`
for the TSLM/RALM, `--recompute-local` for the LocEnc/LocDiT; default `auto` for both): the least of
none/none, none/full, full/none, full/full (TSLM-RALM/local) that `voxcpm_train.model.memory` estimates
to fit 90 % of the device's memory for this model, micro-batch and mix at DP = 1 (the whole optimizer
state on the device). For VoxCPM2-2B on this mix (at most 69 % audio and 54 % loss positions in a
micro-batch) that is full/full on an 80 GB H100 (51.4 GiB estimated; none/full would need 90.3 GiB at
T 8192) and none/full on a 141 GB H200 (90.3 GiB); the CPU smoke run uses none. Each line reports the
choice, the estimate (`estimated_memory_gib`) and the measured peak (`peak_memory_gib`).

Each config warms up (`--warmup` steps), then times `--steps` (>= 20 by default) steps; one JSON line per
config on stdout (progress on stderr): median / min step time, real positions/s, samples/s, model TFLOP/s
(`voxcpm_train.training.flops`: the model's matmuls on the real positions, 3x forward, causal attention
over the packed samples), MFU against the device's dense bf16 peak (989 TFLOP/s for H100/H200, also for the
FP8 configs), peak memory. The last line compares samples/s with the official trainer. A config that fails
(e.g. out of memory) prints its error and the others go on; configs that would start after `--budget-s`
seconds are skipped (reported; the GPU list is ordered most informative first). On a machine without CUDA the tiny model runs in fp32 on the CPU (smoke
use only: no MFU).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

CONFIGS = {
    # name: (transformer_impl, attention_backend, fp8, fp8_recipe, T)
    "sdpa_bf16_4k": ("local", "sdpa", None, "delayed", 4096),
    "te_bf16_4k": ("te", "te", None, "delayed", 4096),
    "te_bf16_8k": ("te", "te", None, "delayed", 8192),
    "te_fp8_8k": ("te", "te", "hybrid", "delayed", 8192),
    "te_fp8cs_8k": ("te", "te", "hybrid", "current", 8192),
    "official_bf16": None,
    # CPU smoke configs (--tiny)
    "tiny_sdpa": ("local", "sdpa", None, "delayed", 256),
    "tiny_official": None,
}
# most informative first: a config that would start past --budget-s is skipped
GPU_CONFIGS = ["te_bf16_4k", "official_bf16", "te_bf16_8k", "sdpa_bf16_4k", "te_fp8_8k", "te_fp8cs_8k"]
TINY_CONFIGS = ["tiny_sdpa", "tiny_official"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- #
# The length mix
# --------------------------------------------------------------------------------------------- #


@dataclasses.dataclass
class Sample:
    text_ids: list
    target_frames: int      # 25 Hz latent frames (= seconds x 25)
    ref_frames: int         # 0 = TTS


def draw_samples(n: int, seed: int, vocab: int, max_seconds: float = 15.0):
    """n samples of the mix: half TTS, half reference clone (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = [int(x) for x in rng.integers(105, vocab, size=int(rng.integers(8, 61)))]
        target = int(rng.uniform(2.0, max_seconds) * 25)
        ref = int(rng.uniform(2.0, 8.0) * 25) if rng.random() < 0.5 else 0
        out.append(Sample(text, target, ref))
    return out


def packed_microbatches(samples, T: int, rows: int, n: int, P: int, D: int, seed: int):
    """`n` micro-batches of `rows` rows x T positions (the micro-batch format of docs/architecture.md),
    samples packed first-fit in draw order with random latents. Returns (micro-batches, samples used)."""
    import numpy as np

    from data_pipeline.sequences import build_sequence, sequence_length

    rng = np.random.default_rng(seed)
    lengths = [sequence_length("clone" if s.ref_frames else "tts", len(s.text_ids), -(-s.target_frames // P),
                               -(-s.ref_frames // P)) for s in samples]
    pool = list(range(len(samples)))
    batches, used = [], 0
    for mb in range(n):
        keys = ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels", "position_ids", "segment_ids")
        out = {k: np.zeros((rows, T), np.float32 if "mask" in k else np.int64) for k in keys}
        out["audio_feats"] = np.zeros((rows, T, P, D), np.float32)
        for r in range(rows):
            pos, seg = 0, 0
            while True:  # first fit over the next 64 samples of the pool
                j = next((j for j in range(min(64, len(pool))) if lengths[pool[j]] <= T - pos), None)
                if j is None:
                    break
                s = samples[pool.pop(j)]
                seq = build_sequence(s.text_ids, rng.standard_normal((s.target_frames, D), dtype=np.float32), P,
                                     ref=rng.standard_normal((s.ref_frames, D), dtype=np.float32) if s.ref_frames else None)
                L = len(seq["text_tokens"])
                seg += 1
                for k, v in seq.items():
                    out[k][r, pos:pos + L] = v
                out["position_ids"][r, pos:pos + L] = np.arange(L)
                out["segment_ids"][r, pos:pos + L] = seg
                pos, used = pos + L, used + 1
            if seg == 0:
                raise RuntimeError("sample pool exhausted (draw more samples)")
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        batch["row_seeds"] = torch.arange(mb * rows, (mb + 1) * rows, dtype=torch.int64)
        batches.append(batch)
    return batches, used


# --------------------------------------------------------------------------------------------- #
# Ours
# --------------------------------------------------------------------------------------------- #

# (parallel.recompute, parallel.recompute_local), least recompute first. Recomputing the TSLM/RALM or the
# LocEnc/LocDiT costs about the same (a third of the forward of about half the model FLOPs each, see
# docs/performance.md); the local stacks hold three times the activations, so they go first.
RECOMPUTE_ORDER = [("none", "none"), ("none", "full"), ("full", "none"), ("full", "full")]


def choose_recompute(cfg, T: int, rows: int, audio_fraction: float, loss_fraction: float, budget_bytes: float,
                     recompute: str = "auto", recompute_local: str = "auto"):
    """(recompute, recompute_local, estimate): the first of RECOMPUTE_ORDER, with `recompute` /
    `recompute_local` where they are not `auto`, whose estimated memory of one device (bf16, DP = 1,
    `voxcpm_train.model.memory`) fits `budget_bytes`; the one needing the least memory when none fits.
    The estimate counts our local layer spec (TE's fused norms save less: an upper bound there)."""
    from voxcpm_train.config.peft import PeftConfig
    from voxcpm_train.model.memory import estimate_training_memory

    local_spec = dataclasses.replace(cfg, transformer_impl="local", attention_backend="sdpa", fp8=None)
    best = None
    for lm, local in RECOMPUTE_ORDER:
        if recompute != "auto":
            lm = recompute
        if recompute_local != "auto":
            local = recompute_local
        est = estimate_training_memory(local_spec, PeftConfig(), row_tokens=T, micro_batch_size=rows, precision="bf16",
                                       recompute=lm, recompute_local=local, audio_fraction=audio_fraction,
                                       loss_fraction=loss_fraction, dp=1)
        if est.device_bytes <= budget_bytes:
            return lm, local, est
        if best is None or est.device_bytes < best[2].device_bytes:
            best = (lm, local, est)
    return best



def run_ours(name: str, args, platform) -> dict:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.parallel import build_model_chunks, build_optimizer, build_scheduler, train_step, unwrap_model
    from voxcpm_train.training.flops import BatchShape, peak_flops_per_device, training_flops
    from voxcpm_train.training.forward import make_forward_step

    impl, attention, fp8, recipe, T = CONFIGS[name]
    T = args.seq_len or T
    cuda = platform.kind == "cuda"
    bf16 = cuda
    preset = "tiny" if args.tiny else "voxcpm2_2b"
    overrides = [f"transformer_impl={impl}", f"attention_backend={attention}", f"fp8_recipe={recipe}",
                 f"params_dtype={'bfloat16' if bf16 else 'float32'}", f"max_length={max(T, 8192)}"]
    if fp8:
        overrides.append(f"fp8={fp8}")
    cfg = load_model_preset(preset, overrides)
    rows = args.rows or max(1, (8192 if cuda else 512) // T)
    n_mb = args.microbatches
    total_steps = args.warmup + args.steps
    samples = draw_samples(total_steps * n_mb * rows * (T // 60 + 4), seed=1, vocab=cfg.vocab_size,
                           max_seconds=min(15.0, (T - 80) / 6.25))
    batches, used = packed_microbatches(samples, T, rows, total_steps * n_mb, cfg.patch_size, cfg.feat_dim, seed=2)
    shapes = [BatchShape.of_batch(b) for b in batches]
    estimate = None
    if cuda:   # the most audio / loss positions of any micro-batch
        audio = max(float(b["audio_mask"].mean()) for b in batches)
        loss = max(float(b["loss_mask"].mean()) for b in batches)
        budget = 0.9 * torch.cuda.get_device_properties(platform.device).total_memory
        recompute, recompute_local, estimate = choose_recompute(cfg, T, rows, audio, loss, budget, args.recompute,
                                                                args.recompute_local)
    else:
        recompute, recompute_local = (("none" if v == "auto" else v) for v in (args.recompute, args.recompute_local))
    cfg = dataclasses.replace(cfg, recompute_granularity=None if recompute == "none" else recompute,
                              recompute_local_granularity=None if recompute_local == "none" else recompute_local)

    def provider(pre_process, post_process):
        return VoxCPMModel(cfg, pre_process=pre_process, post_process=post_process,
                           use_cpu_initialization=not cuda)

    dtype = torch.bfloat16 if bf16 else torch.float32
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=bf16, use_distributed_optimizer=True,
                                        overlap_grad_reduce=True, overlap_param_gather=True)
    chunks = build_model_chunks(provider, ddp, device=platform.device, param_dtype=dtype)
    opt = build_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, min_lr=1e-5, weight_decay=0.1, clip_grad=1.0,
                                          bf16=bf16, params_dtype=dtype, use_distributed_optimizer=True), chunks)
    sched = build_scheduler(opt, max_lr=1e-4, min_lr=1e-5)
    forward_step = make_forward_step(cfg, platform.device)
    model = unwrap_model(chunks[0])
    # what the built stacks run (megatron's TransformerConfig of the TSLM and of the LocDiT)
    built = {"recompute": model.base_lm.config.recompute_granularity or "none",
             "recompute_local": model.feat_decoder.estimator.decoder.config.recompute_granularity or "none"}

    log(f"[{name}] {cfg.transformer_impl}/{cfg.attention_backend}/{'fp8 ' + fp8 + ' ' + recipe if fp8 else str(dtype)}"
        f", T={T}, {rows} row(s) x {n_mb} micro-batch(es) per step, {total_steps} steps, recompute {recompute} "
        f"(TSLM/RALM) / {recompute_local} (LocEnc/LocDiT)"
        + (f", estimated {estimate.device_bytes / 2**30:.1f} GiB" if estimate is not None else ""))

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(total_steps):
        mbs = batches[step * n_mb:(step + 1) * n_mb]
        sync()
        t0 = time.perf_counter()
        res = train_step(forward_step, iter(mbs), chunks, opt, sched, num_microbatches=n_mb, seq_length=2 * T,
                         micro_batch_size=rows, increment=n_mb * rows)
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(res.loss))
        if step >= args.warmup:
            times.append(dt)
        log(f"  [{name}] step {step + 1}/{total_steps}: {dt:.3f} s, loss {losses[-1]:.3f}")
    timed = shapes[args.warmup * n_mb:]
    positions = sum(s.positions for s in timed) / args.steps
    flops = sum(training_flops(cfg, s) for s in timed) / args.steps
    segments = sum(len(s.sequence_lengths) for s in timed) / args.steps
    med = statistics.median(times)
    peak = peak_flops_per_device(args.peak_tflops)
    result = {
        "config": name, "model": preset, "transformer_impl": cfg.transformer_impl,
        "attention": cfg.attention_backend, "precision": f"fp8-{fp8}-{recipe}" if fp8 else str(dtype).split(".")[-1],
        "T": T, "rows_per_microbatch": rows, "microbatches_per_step": n_mb, "steps_timed": args.steps,
        **built,
        "estimated_memory_gib": estimate.device_bytes / 2**30 if estimate is not None else None,
        "step_time_s": med, "step_time_min_s": min(times),
        "real_positions_per_step": positions, "real_position_fraction": positions / (n_mb * rows * T),
        "positions_per_s": positions / med, "samples_per_s": segments / med,
        "model_tflops_per_step": flops / 1e12, "model_tflops_per_s": flops / med / 1e12,
        "mfu": flops / med / peak if peak else None, "peak_tflops": peak / 1e12 if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,   # + the allocator's cache
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    del chunks, opt, sched, batches
    return result


# --------------------------------------------------------------------------------------------- #
# The official trainer (benchmarks/bench_train_vs_official.py)
# --------------------------------------------------------------------------------------------- #


def run_official(name: str, args, platform) -> dict:
    import numpy as np

    from bench_train_vs_official import official_throughput

    from data_pipeline.audio_vae import AudioVAEConfig
    from voxcpm_train.config.model import load_model_preset

    cuda = platform.kind == "cuda"
    cfg = load_model_preset("tiny" if args.tiny else "voxcpm2_2b")
    vae_cfg = AudioVAEConfig.preset("small" if args.tiny else "full").to_dict()
    rng = np.random.default_rng(3)
    pool = draw_samples(max(64, 2 * args.official_batch), seed=4, vocab=cfg.vocab_size,
                        max_seconds=15.0 if not args.tiny else 4.0)
    items = []
    for s in pool:  # raw 16 kHz audio of the sample's durations (the official packer encodes it every step)
        audio = (0.1 * rng.standard_normal(s.target_frames * 640)).astype(np.float32)
        ref = (0.1 * rng.standard_normal(s.ref_frames * 640)).astype(np.float32) if s.ref_frames else []
        items.append((s.text_ids, audio, ref))
    steps = argparse.Namespace(warmup=args.warmup, steps=args.steps, batch=args.official_batch)
    log(f"[{name}] official voxcpm step: {args.official_batch} utterances per step, padded, "
        f"{'bf16 autocast' if cuda else 'fp32'}, AudioVAE ({'small' if args.tiny else 'full'}) encode in the step")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with contextlib.redirect_stdout(sys.stderr):
        r = official_throughput(steps, cfg, vae_cfg, items, device=str(platform.device),
                                amp_dtype=torch.bfloat16 if cuda else None)
    return {"config": name, "model": "tiny" if args.tiny else "voxcpm2_2b", "trainer": "voxcpm 2.0.3 fine-tuner logic",
            "precision": "bf16-autocast" if cuda else "float32", "batch": r["batch"], "steps_timed": args.steps,
            "step_time_s": r["s_per_step"], "samples_per_s": r["utterances_per_s"],
            "positions_per_s": r["positions_per_s"], "vae_encode_share": r["vae_encode_share"],
            "positions_per_s_without_encode": r["positions_per_s_without_encode"],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="default: all GPU configs (CPU: tiny)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (default without CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per config (default 20; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    ap.add_argument("--microbatches", type=int, default=2, help="micro-batches per step")
    ap.add_argument("--rows", type=int, default=None, help="rows per micro-batch (default 8192 // T, tiny 512 // T)")
    ap.add_argument("--seq-len", type=int, default=None, help="override every config's T")
    ap.add_argument("--recompute", default="auto", choices=["auto", "none", "selective", "full"],
                    help="activation recompute of the TSLM/RALM layers (parallel.recompute; auto: see above)")
    ap.add_argument("--recompute-local", default="auto", choices=["auto", "none", "full"],
                    help="activation recompute of the LocEnc/LocDiT layers (parallel.recompute_local; auto: see above)")
    ap.add_argument("--official-batch", type=int, default=None, help="official: utterances per step (16; tiny 4)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: by device name)")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="skip configs that would start after this many seconds (default fits 8 min on one H100)")
    ap.add_argument("--json", type=Path, help="also write all result lines here")
    args = ap.parse_args(argv)

    from voxcpm_train.platform import init_distributed, setup_platform

    platform = setup_platform("auto")
    args.tiny = args.tiny or platform.kind != "cuda"
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.official_batch = args.official_batch or (4 if args.tiny else 16)
    configs = args.configs or (TINY_CONFIGS if args.tiny else GPU_CONFIGS)
    init_distributed(platform)
    from voxcpm_train.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=1234)
    if platform.kind == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    start, results = time.perf_counter(), []
    device_name = torch.cuda.get_device_name() if platform.kind == "cuda" else platform.kind
    for name in configs:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            result = {"config": name, "skipped": f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}"}
        else:
            t0 = time.perf_counter()
            try:
                result = (run_official if CONFIGS[name] is None else run_ours)(name, args, platform)
            except Exception as err:  # noqa: BLE001 - report and go on with the other configs
                result = {"config": name, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            result["wall_s"] = time.perf_counter() - t0
        result["device"] = device_name
        results.append(result)
        print(json.dumps(result), flush=True)
        gc.collect()
        if platform.kind == "cuda":
            torch.cuda.empty_cache()
    ours = [r for r in results if "samples_per_s" in r and "trainer" not in r]
    official = [r for r in results if "trainer" in r and "samples_per_s" in r]
    if ours and official:
        best = max(ours, key=lambda r: r["samples_per_s"])
        summary = {"summary": "samples/s ours / official", "best": best["config"],
                   "ratio": best["samples_per_s"] / official[0]["samples_per_s"],
                   "total_wall_s": time.perf_counter() - start, "device": device_name}
        results.append(summary)
        print(json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in results) + "\n")


if __name__ == "__main__":
    main()
