"""`voxcpm-data inspect DIR`: hours, samples, speakers, languages and a length histogram of latent shards."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def summarize(path: str | Path) -> dict:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    samples = []
    for unit in meta["units"]:
        f = path / f"{unit}.index.json"
        if f.is_file():
            samples += json.loads(f.read_text())["samples"]
    durs = [s["duration"] for s in samples]
    edges = [0, 1, 2, 4, 8, 15, 30, float("inf")]
    hist = Counter()
    for d in durs:
        for lo, hi in zip(edges, edges[1:]):
            if lo <= d < hi:
                hist[f"{lo}-{hi if hi != float('inf') else ''} s"] += 1
                break
    report = path / "report.json"
    return {
        "samples": len(samples), "hours": sum(durs) / 3600,
        "speakers": len({s.get("speaker") for s in samples if s.get("speaker")}),
        "languages": dict(Counter(s.get("language") or "?" for s in samples).most_common()),
        "with_description": sum(1 for s in samples if s.get("description")),
        "length_histogram": {f"{lo}-{hi if hi != float('inf') else ''} s": hist.get(f"{lo}-{hi if hi != float('inf') else ''} s", 0)
                             for lo, hi in zip(edges, edges[1:])},
        "vae": meta["vae"]["weights"], "shards": len(meta["units"]),
        "skipped": json.loads(report.read_text())["skipped"] if report.is_file() else None,
    }


def print_summary(path: str | Path) -> dict:
    s = summarize(path)
    print(f"{path}: {s['samples']} samples, {s['hours']:.3f} h, {s['speakers']} speakers, {s['shards']} shards, "
          f"VAE weights: {s['vae']}")
    print("languages: " + ", ".join(f"{k} {v}" for k, v in s["languages"].items()))
    print(f"voice-design descriptions: {s['with_description']}")
    if s["skipped"] is not None:
        print(f"skipped at encode: {s['skipped'] or 'none'}")
    top = max(s["length_histogram"].values()) or 1
    print("length histogram:")
    for k, v in s["length_histogram"].items():
        print(f"  {k:>8} {v:7d} {'#' * round(40 * v / top)}")
    return s
