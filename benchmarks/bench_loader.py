"""Loader throughput and packing efficiency on the demo corpus (CPU).

    python benchmarks/bench_loader.py [--latents DIR] [--microbatches 200] [--workers 0 2]
Encodes demo_data/emilia with the small VAE into --latents first if that folder is missing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_pipeline.config import DataConfig, DatasetConfig
from data_pipeline.encode import EncodeOptions, run_encode
from data_pipeline.loader import VoxCPMDataLoader

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", default="/tmp/voxcpm_bench_latents")
    ap.add_argument("--microbatches", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--row-tokens", type=int, nargs="+", default=[512, 1024])
    args = ap.parse_args()
    if not (Path(args.latents) / "report.json").is_file():
        run_encode([str(REPO / "demo_data" / "emilia")], args.latents, EncodeOptions(vae_config="small"))
    results = []
    for row_tokens in args.row_tokens:
        for workers in args.workers:
            cfg = DataConfig(datasets=[DatasetConfig(name="demo", path=args.latents)],
                             tokenizer_path=str(REPO / "demo_data" / "tokenizer"), row_tokens=row_tokens,
                             rows_per_microbatch=2, window_samples=1024, num_workers=workers)
            loader = VoxCPMDataLoader(cfg)
            next(loader)  # start-up (index, tokenizer cache, worker spawn) not timed
            real = total = samples = 0
            t0 = time.perf_counter()
            for _ in range(args.microbatches):
                b = next(loader)
                seg = b["segment_ids"]
                real += int((seg > 0).sum())
                total += seg.numel()
                samples += int(sum(len(r.unique()) - int((r == 0).any()) for r in seg))
            dt = time.perf_counter() - t0
            r = {"row_tokens": row_tokens, "workers": workers, "microbatches_per_s": round(args.microbatches / dt, 1),
                 "samples_per_s": round(samples / dt, 1), "positions_per_s": round(total / dt),
                 "real_position_fraction": round(real / total, 4)}
            print(r, flush=True)
            results.append(r)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
