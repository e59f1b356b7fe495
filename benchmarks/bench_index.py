"""The columnar sample index at scale: build time, one rank's loader start-up, RSS and planning rate.

    python benchmarks/bench_index.py --samples N [--json] [--dir DIR] [--workers W] [--keep]

1. Synthesizes a latent folder of N samples as `voxcpm-data encode` writes it: units of 2,000 samples,
   each a `<unit>.index.json` sidecar (realistic lengths: lognormal durations 0.5-30 s around 5.5 s, text
   ~2.7 words/s or ~4.5 CJK characters/s, windows of the demo corpus' running text; ~N/50 speakers; 6 languages
   with Emilia-like shares; dnsmos ~ N(3.3, 0.2); 1 % voice-design descriptions) and a tiny tar (one
   shared latent, hard-linked) that every entry points at (the benchmark plans, it does not read audio).
2. Index build: `voxcpm-data index DIR --tokenizer demo_data/tokenizer` (sidecars -> index.npz, then
   parallel tokenization -> tokens-<fp>.npz), timed.
3. One rank, in a fresh process, twice: with the index files evicted from the page cache (cold; posix_fadvise
   DONTNEED) and again (warm): loader start-up = `VoxCPMDataLoader(cfg)` (two datasets on the folder: all
   samples, and an `hq` subset filtered on dnsmos + language) up to its first planned micro-batch; then
   (warm run) the planner runs for --plan-seconds: micro-batches/s and samples/s; RSS / USS / PSS
   (psutil) and anonymous (truly per-process) memory after that; and the planning rate without
   continuation layouts (no joined texts to tokenize at plan time).
   Config as configs/data/emilia.yaml: rows of 8192 positions, 1 row per micro-batch, windows of 8192.
Prints one JSON line (with --json only that line).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

UNIT = 2000
LANGS = [("en", 0.46), ("zh", 0.44), ("de", 0.04), ("fr", 0.03), ("ja", 0.02), ("ko", 0.01)]


def _streams() -> tuple[list[str], list[str]]:
    """The demo corpus' transcripts as one running stream of words (Latin-script languages) and one of
    characters (Chinese): a sample's text is a window of it (natural text the demo tokenizer was fit on)."""
    words, chars = [], []
    for t in sorted((REPO / "demo_data" / "emilia").glob("*.tar")):
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    text = json.loads(tar.extractfile(m).read())["text"].strip()
                    if any("\u4e00" <= c <= "\u9fff" for c in text):
                        chars += list(text)
                    else:
                        words += text.split()
    return words * 4, chars * 8


def synthesize(folder: Path, n: int, seed: int = 0, log=print) -> float:
    """Write the folder (meta.json, sidecars, tiny tars). Returns seconds taken."""
    from data_pipeline.shards import json_bytes, member_offsets, npy_bytes, tar_bytes

    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words, chars = _streams()
    units = [f"synth-{u:06d}" for u in range(-(-n // UNIT))]
    template = folder / ".template.tar"
    lat = np.zeros((8, 64), np.float16)
    data = tar_bytes([("x.latent.npy", npy_bytes(lat)), ("x.json", b"{}")])
    template.write_bytes(data)
    offs = member_offsets(data)
    (lat_off, lat_size), (js_off, js_size) = offs["x.latent.npy"], offs["x.json"]
    n_spk = max(1, n // 50)
    lang_names = [x for x, _ in LANGS]
    lang_p = np.asarray([p for _, p in LANGS])
    spk_lang = np.random.default_rng(seed + 1).choice(len(LANGS), size=n_spk, p=lang_p)   # one per speaker
    for u, name in enumerate(units):
        k = min(UNIT, n - u * UNIT)
        dur = np.clip(rng.lognormal(np.log(5.5), 0.6, k), 0.5, 30.0)
        frames = 4 * np.ceil(dur * 25 / 4).astype(np.int64)
        spk = rng.integers(0, n_spk, k)
        lang = spk_lang[spk]
        dns = np.clip(rng.normal(3.3, 0.2, k), 3.0, 4.2)
        desc = rng.random(k) < 0.01
        # texts: word / character counts from the duration, drawn for the whole unit at once
        cjk = np.isin(lang, [lang_names.index("zh"), lang_names.index("ja")])
        count = np.maximum(1, np.where(cjk, dur * 4.5, dur * 2.7).astype(np.int64))
        start = rng.random(k)
        parts = []
        for i in range(k):
            lg, m = lang_names[lang[i]], int(count[i])
            src = chars if cjk[i] else words
            a = int(start[i] * (len(src) - min(m, len(src))))
            text = "".join(src[a:a + m]) if cjk[i] else " ".join(src[a:a + m])
            key = f"{lg.upper()}_B{u:06d}_S{i:05d}"
            extra = ',"description":"a calm, low voice"' if desc[i] else ""
            parts.append(f'{{"dnsmos":{dns[i]:.4f},"duration":{dur[i]:.4f},"frames":{frames[i]},"id":"{key}",'
                         f'"json":[{js_off},{js_size}],"key":"{key}","language":"{lg}","latent":[{lat_off},{lat_size}],'
                         f'"source_key":"{name}/{key}","speaker":"{lg.upper()}_S{spk[i]:08d}",'
                         f'"text":{json.dumps(text, ensure_ascii=False)}{extra}}}')
        sidecar = f'{{"samples":[{",".join(parts)}],"shard":"{name}.tar"}}'.encode("utf-8")
        (folder / f"{name}.index.json").write_bytes(sidecar)
        (folder / f"{name}.report.json").write_bytes(json_bytes({"kept": k, "skipped": {}, "seconds": float(dur.sum())}))
        os.link(template, folder / f"{name}.tar")
        if (u + 1) % max(1, len(units) // 10) == 0:
            log(f"synthesized {min(n, (u + 1) * UNIT)}/{n} samples ({time.time() - t0:.0f} s)")
    meta = {"format": "voxcpm-latents-v1", "sample_rate": 16000, "frame_rate_hz": 25.0, "latent_dim": 64,
            "frames_multiple": 4, "min_seconds": 0.5, "max_seconds": 30.0,
            "vae": {"weights": "synthetic"}, "units": units}
    (folder / "meta.json").write_bytes(json_bytes(meta))
    template.unlink()
    return time.time() - t0


RANK = r"""
import json, os, sys, time
t_imp = time.time()
import psutil
from data_pipeline.config import DataConfig, DatasetConfig, LayoutProbs
from data_pipeline.loader import VoxCPMDataLoader
folder, tok, plan_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
t_imp = time.time() - t_imp
lay = LayoutProbs(tts=0.4, clone=0.3, continuation=0.15, clone_continuation=0.15)
cfg = DataConfig(datasets=[DatasetConfig(name="emilia", path=folder, weight=0.7, layouts=lay),
                           DatasetConfig(name="hq", path=folder, weight=0.3, layouts=lay,
                                         filter={"min_dnsmos": 3.4, "languages": ["en", "zh"]})],
                 tokenizer_path=tok, row_tokens=8192, rows_per_microbatch=1, window_samples=8192,
                 max_ref_patches=75, num_workers=0)
t0 = time.time()
loader = VoxCPMDataLoader(cfg)
t_ds = time.time() - t0
_, plans = loader.planner.next_window()
while not plans:
    _, plans = loader.planner.next_window()
t_start = time.time() - t0
mbs = samples = positions = 0
t1 = time.time()
while time.time() - t1 < plan_s:
    _, plans = loader.planner.next_window()
    mbs += len(plans)
    for p in plans:
        for row in p["rows"]:
            samples += len(row)
            positions += sum(s.length for s in row)
dt = time.time() - t1
st = loader.state_dict()
mem = psutil.Process().memory_full_info()
anon = 0
with open("/proc/self/smaps_rollup") as f:          # private memory that is not file pages of a mapping
    for line in f:
        if line.startswith("Anonymous:"):
            anon = int(line.split()[1]) * 1024
# the same datasets planned without continuation layouts (no joined prompt_text + text to tokenize)
from data_pipeline.packing import BatchPlanner
nc = dict(tts=0.55, clone=0.45, continuation=0.0, clone_continuation=0.0)
p2 = BatchPlanner(loader.datasets, loader.weights, [nc, nc], cfg, loader.tokenizer)
p2.next_window()
mbs2, t2 = 0, time.time()
while time.time() - t2 < min(plan_s, 3.0):
    mbs2 += len(p2.next_window()[1])
dt2 = time.time() - t2
print(json.dumps({"imports_s": round(t_imp, 2), "datasets_s": round(t_ds, 2), "startup_s": round(t_start, 2),
                  "planner_microbatches_per_s": round(mbs / dt, 1), "planner_samples_per_s": round(samples / dt),
                  "real_positions": round(positions / max(mbs * cfg.row_tokens, 1), 4),
                  "rss_gib": round(mem.rss / 2**30, 3), "uss_gib": round(mem.uss / 2**30, 3),
                  "pss_gib": round(mem.pss / 2**30, 3), "anon_gib": round(anon / 2**30, 3),
                  "planner_microbatches_per_s_no_continuation": round(mbs2 / dt2, 1), "dataset_sizes": st["dataset_sizes"],
                  "state_json_bytes": len(json.dumps(st))}))
"""


def evict(folder: Path) -> None:
    """Drop the folder's index files from the page cache (a cold start without root)."""
    for p in list(folder.glob("*.npz")) + list(folder.glob("*.index.json")):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_rank(folder: Path, tokenizer: str, plan_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", RANK, str(folder), tokenizer, str(plan_s)], env=env, cwd=REPO,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, required=True)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--dir", default=None, help="folder to synthesize into (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the synthesized folder")
    ap.add_argument("--workers", type=int, default=None, help="index build processes (default min(8, cores))")
    ap.add_argument("--plan-seconds", type=float, default=6.0, help="planning time of the warm rank")
    ap.add_argument("--tokenizer", default=str(REPO / "demo_data" / "tokenizer"))
    args = ap.parse_args()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    import logging
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    from data_pipeline.index import build_folder_index

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="voxcpm_bench_index_"))
    folder = root / f"synth-{args.samples}"
    try:
        if not (folder / "meta.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            t_syn = synthesize(folder, args.samples, log=log)
            log(f"synthesized {args.samples} samples in {t_syn:.0f} s")
        else:
            t_syn = None
            for f in folder.glob("*.npz"):
                f.unlink()
        t0 = time.time()
        summary = build_folder_index(folder, args.tokenizer, args.workers)
        t_build = time.time() - t0
        sizes = {p.name: p.stat().st_size for p in folder.glob("*.npz")}
        log(f"index built in {t_build:.1f} s: {summary}")
        evict(folder)
        cold = run_rank(folder, args.tokenizer, 1.0)
        log(f"cold rank: {cold}")
        warm = run_rank(folder, args.tokenizer, args.plan_seconds)
        log(f"warm rank: {warm}")
        load = os.getloadavg()
        out = {"samples": args.samples, "speakers": summary["speakers"], "synthesize_s": t_syn and round(t_syn, 1),
               "index_build_s": round(t_build, 1), "index_s": summary["index_s"], "tokens_s": summary["tokens_s"],
               "index_mib": round(sizes.get("index.npz", 0) / 2**20, 1),
               "tokens_mib": round(sum(v for k, v in sizes.items() if k.startswith("tokens-")) / 2**20, 1),
               "startup_cold_s": cold["startup_s"], "startup_warm_s": warm["startup_s"],
               "rank_imports_s": warm["imports_s"], "rss_gib": warm["rss_gib"], "uss_gib": warm["uss_gib"],
               "pss_gib": warm["pss_gib"], "anon_gib": warm["anon_gib"], "rss_cold_gib": cold["rss_gib"],
               "planner_microbatches_per_s": warm["planner_microbatches_per_s"],
               "planner_samples_per_s": warm["planner_samples_per_s"],
               "planner_microbatches_per_s_no_continuation": warm["planner_microbatches_per_s_no_continuation"],
               "real_positions": warm["real_positions"],
               "dataset_sizes": warm["dataset_sizes"], "state_json_bytes": warm["state_json_bytes"],
               "cpus": os.cpu_count(), "loadavg_1m": round(load[0], 2)}
        print(json.dumps(out), flush=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
