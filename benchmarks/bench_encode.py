"""Encode throughput of `voxcpm-data encode`'s stages on this machine: audio decoding (soundfile +
resample) and the AudioVAE V2 encoder (small / full configs), in audio hours per wall hour.

    python benchmarks/bench_encode.py [--configs small full] [--seconds 40] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data_pipeline.audio import decode_audio
from data_pipeline.encode import EncodeOptions, LatentEncoder
from data_pipeline.encode import iter_inputs

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(REPO / "demo_data" / "emilia"))
    ap.add_argument("--configs", nargs="+", default=["small", "full"])
    ap.add_argument("--seconds", type=float, default=40.0, help="audio used for the full-size encoder")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch-seconds", type=float, default=32.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    audios = [decode_audio(s.audio, s.key) for s in iter_inputs([args.input])]
    t_dec = time.perf_counter() - t0
    total = sum(len(a) for a in audios) / 16000
    results = {"threads": args.threads, "device": "cpu", "decode": {
        "audio_s": round(total, 1), "wall_s": round(t_dec, 2), "audio_h_per_h": round(total / t_dec, 1)}}
    for name in args.configs:
        enc = LatentEncoder(EncodeOptions(vae_config=name, batch_seconds=args.batch_seconds, device="cpu"))
        subset, acc = [], 0.0
        limit = total if name != "full" else args.seconds
        for a in audios:
            if acc >= limit:
                break
            subset.append(a)
            acc += len(a) / 16000
        enc(subset[:1])  # warm-up
        t0 = time.perf_counter()
        enc(subset)
        dt = time.perf_counter() - t0
        results[name] = {"audio_s": round(acc, 1), "wall_s": round(dt, 2), "audio_h_per_h": round(acc / dt, 2),
                         "params_M": round(sum(p.numel() for p in enc.vae.parameters()) / 1e6, 2)}
        print(name, results[name], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
