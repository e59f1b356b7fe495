"""`voxcpm-data inspect DIR`: hours, samples, speakers, languages, references and a length histogram of
latent shards (read from the folder's columnar index)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .index import open_index

EDGES = [0, 1, 2, 4, 8, 15, 30, float("inf")]


def summarize(path: str | Path) -> dict:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    ix = open_index(path)
    durs = np.asarray(ix.duration)
    labels = [f"{lo}-{hi if hi != float('inf') else ''} s" for lo, hi in zip(EDGES, EDGES[1:])]
    hist = np.histogram(durs, bins=EDGES)[0] if len(durs) else np.zeros(len(labels), np.int64)
    langs = np.bincount(np.asarray(ix.language, np.int64), minlength=len(ix.languages)) if ix.n else []
    languages = {(ix.languages[i] or "?"): int(c) for i, c in enumerate(langs) if c}
    report = path / "report.json"
    return {
        "samples": ix.n, "hours": float(durs.sum()) / 3600, "speakers": ix.num_speakers,
        "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])),
        "with_description": int(np.count_nonzero(ix.has_description)),
        "with_reference": int(np.count_nonzero(np.asarray(ix.ref_frames) > 0)),
        "length_histogram": {k: int(v) for k, v in zip(labels, hist)},
        "vae": meta["vae"]["weights"], "shards": len(meta["units"]),
        "skipped": json.loads(report.read_text())["skipped"] if report.is_file() else None,
        "dropped_fields": json.loads(report.read_text()).get("dropped_fields") if report.is_file() else None,
    }


def print_summary(path: str | Path) -> dict:
    s = summarize(path)
    print(f"{path}: {s['samples']} samples, {s['hours']:.3f} h, {s['speakers']} speakers, {s['shards']} shards, "
          f"VAE weights: {s['vae']}")
    print("languages: " + ", ".join(f"{k} {v}" for k, v in s["languages"].items()))
    print(f"voice-design descriptions: {s['with_description']}; own reference clips (ref_audio): "
          f"{s['with_reference']}")
    if s["skipped"] is not None:
        print(f"skipped at encode: {s['skipped'] or 'none'}")
    if s["dropped_fields"]:
        print(f"source fields dropped at encode: {s['dropped_fields']}")
    top = max(s["length_histogram"].values()) or 1
    print("length histogram:")
    for k, v in s["length_histogram"].items():
        print(f"  {k:>8} {v:7d} {'#' * round(40 * v / top)}")
    return s
