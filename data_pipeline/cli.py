"""`voxcpm-data`: encode raw corpora into latent shards, inspect them.

    voxcpm-data encode INPUT... --output DIR [--vae audiovae.safetensors] [--config small|full]
                       [--tokenizer MODEL_DIR] [--batch-seconds N] [--min-seconds S] [--max-seconds S]
                       [--device auto|cpu|cuda|npu]
    torchrun --nproc-per-node 8 -m data_pipeline.cli encode ...      # each rank encodes its own shards
    voxcpm-data index DIR [--tokenizer MODEL_DIR] [--workers N]      # (re)build the columnar sample index
    voxcpm-data inspect DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voxcpm-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    enc = sub.add_parser("encode", help="raw audio + text -> AudioVAE V2 latent shards")
    enc.add_argument("inputs", nargs="+", help="Emilia-style tars / folders of tars, .jsonl manifests, audio folders")
    enc.add_argument("--output", "-o", required=True)
    enc.add_argument("--vae", default=None, help="audiovae.safetensors (default: seeded random init, recorded)")
    enc.add_argument("--config", default="small", choices=["tiny", "small", "full"], help="AudioVAE size")
    enc.add_argument("--batch-seconds", type=float, default=32.0, help="padded audio seconds per encoder call")
    enc.add_argument("--min-seconds", type=float, default=0.5)
    enc.add_argument("--max-seconds", type=float, default=30.0)
    enc.add_argument("--samples-per-shard", type=int, default=2000, help="for manifests and audio folders")
    enc.add_argument("--device", default="auto")
    enc.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    enc.add_argument("--seed", type=int, default=0, help="seed of the random init when no --vae is given")
    enc.add_argument("--tokenizer", default=None,
                     help="tokenizer folder (data.tokenizer_path): store token ids in the index at encode time")
    enc.add_argument("--index-workers", type=int, default=None, help="processes building the index")
    idx = sub.add_parser("index", help="build the columnar sample index (+ token ids) of a latent folder")
    idx.add_argument("dir")
    idx.add_argument("--tokenizer", default=None, help="tokenizer folder (data.tokenizer_path) to tokenize with")
    idx.add_argument("--workers", type=int, default=None, help="processes (default: min(8, cores))")
    idx.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ins = sub.add_parser("inspect", help="summarize a folder of latent shards")
    ins.add_argument("dir")
    ins.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.cmd == "encode":
        from .encode import EncodeOptions, run_encode

        opts = EncodeOptions(min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                             batch_seconds=args.batch_seconds, samples_per_shard=args.samples_per_shard,
                             vae_config=args.config, vae_path=args.vae, seed=args.seed, device=args.device,
                             dtype=args.dtype, tokenizer_path=args.tokenizer, index_workers=args.index_workers)
        report = run_encode(args.inputs, args.output, opts)
        if report is not None:
            print(json.dumps(report))
        return 0
    if args.cmd == "index":
        from .index import build_folder_index

        print(json.dumps(build_folder_index(args.dir, args.tokenizer, args.workers, force=args.force)))
        return 0
    if args.cmd == "inspect":
        from .inspect_shards import print_summary, summarize

        if args.json:
            print(json.dumps(summarize(args.dir), indent=1))
        else:
            print_summary(args.dir)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
