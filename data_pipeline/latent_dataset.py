"""A folder of latent shards (from `voxcpm-data encode`) as an indexed, random-access dataset.

Only the sidecar `*.index.json` files are read at start-up (no tar scan); a sample is one seek + read.
Texts are tokenized once per tokenizer and cached as NumPy arrays (`tokens-<fingerprint>.npz`, always over
the whole folder). A `SampleFilter` (config.py) restricts the dataset to a subset of the folder's samples
when the index is built: everything below (indices, speakers, reference clips) sees only that subset.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

from .config import SampleFilter, to_dict
from .sequences import num_patches, text_with_description
from .shards import atomic_write_bytes, load_npy, read_member
from .tokenizer import TextTokenizer


log = logging.getLogger(__name__)
FILTER_KEYS = tuple(f.name for f in dataclasses.fields(SampleFilter))


def canonical_filter(spec, dataset: str = "?") -> dict:
    """The set conditions of a filter spec (dict, OmegaConf node, `SampleFilter` or None), validated and in a
    canonical JSON form (floats, sorted lower-case languages); `{}` keeps every sample. Used to compare the
    filters of a checkpoint with the config's."""
    d = to_dict(spec) if spec is not None else {}
    unknown = sorted(set(d) - set(FILTER_KEYS))
    if unknown:
        raise ValueError(f"dataset {dataset!r}: unknown filter key(s) {unknown}; known: {list(FILTER_KEYS)}")
    out: dict = {}
    for k in ("min_dnsmos", "min_duration", "max_duration"):
        if d.get(k) is not None:
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"dataset {dataset!r}: filter.{k} must be a number or null, got {v!r}")
            out[k] = float(v)
    req = d.get("require_description", False)
    if not isinstance(req, bool):
        raise ValueError(f"dataset {dataset!r}: filter.require_description must be true/false, got {req!r}")
    if req:
        out["require_description"] = True
    langs = d.get("languages")
    if langs is not None:
        if isinstance(langs, str):
            langs = [langs]
        out["languages"] = sorted({str(x).strip().lower() for x in langs})
        if not out["languages"]:
            raise ValueError(f"dataset {dataset!r}: filter.languages is empty (keeps nothing); null keeps all")
    if out.get("min_duration", -math.inf) > out.get("max_duration", math.inf):
        raise ValueError(f"dataset {dataset!r}: filter.min_duration {out['min_duration']} > "
                         f"max_duration {out['max_duration']}")
    return out


def filter_conditions(samples: list[dict], flt: dict, frame_rate: float) -> dict[str, np.ndarray]:
    """Per set condition of the canonical filter `flt`, a bool array over `samples`: which pass it."""
    n = len(samples)
    cond: dict[str, np.ndarray] = {}
    if "min_dnsmos" in flt:
        v = np.asarray([s["dnsmos"] if isinstance(s.get("dnsmos"), (int, float)) else np.nan for s in samples],
                       dtype=np.float64).reshape(n)
        with np.errstate(invalid="ignore"):
            cond["min_dnsmos"] = v >= flt["min_dnsmos"]          # NaN (no dnsmos) fails
    if flt.get("require_description"):
        cond["require_description"] = np.asarray([bool(str(s.get("description") or "").strip()) for s in samples],
                                                 dtype=bool).reshape(n)
    if "languages" in flt:
        keep = set(flt["languages"])
        cond["languages"] = np.asarray([str(s.get("language") or "").strip().lower() in keep for s in samples],
                                       dtype=bool).reshape(n)
    if "min_duration" in flt or "max_duration" in flt:
        dur = np.asarray([s["duration"] if isinstance(s.get("duration"), (int, float)) else s["frames"] / frame_rate
                          for s in samples], dtype=np.float64).reshape(n)
        if "min_duration" in flt:
            cond["min_duration"] = dur >= flt["min_duration"]
        if "max_duration" in flt:
            cond["max_duration"] = dur <= flt["max_duration"]
    return cond


class LatentDataset:
    """Index arrays (length N) + `latent(i)` [T, 64] float16 + `text_ids(i)`.

    `filter` (a `SampleFilter` spec) keeps a deterministic subset of the folder, in index order; `name`
    only labels error messages. `source_index[i]` is sample i's position in the unfiltered folder."""

    def __init__(self, path: str | Path, tokenizer: TextTokenizer | None = None, patch_size: int = 4,
                 filter=None, name: str | None = None):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: no meta.json; run `voxcpm-data encode ... --output {self.path}`")
        self.meta = json.loads(meta_path.read_text())
        self.name = name or self.path.name
        self.filter = canonical_filter(filter, self.name)
        self.shards: list[Path] = []
        all_samples: list[dict] = []
        shard_ids = []
        for unit in self.meta["units"]:
            idx_path = self.path / f"{unit}.index.json"
            if not idx_path.is_file():
                raise FileNotFoundError(f"{idx_path} missing: the encode run of {self.path} is not finished")
            entries = json.loads(idx_path.read_text())["samples"]
            shard_ids += [len(self.shards)] * len(entries)
            self.shards.append(self.path / f"{unit}.tar")
            all_samples += entries
        self.source_size = len(all_samples)
        self.source_index = self._apply_filter(all_samples)
        self.samples: list[dict] = [all_samples[i] for i in self.source_index]
        self.shard_id = np.asarray(shard_ids, dtype=np.int32).reshape(-1)[self.source_index]
        self.frames = np.asarray([s["frames"] for s in self.samples], dtype=np.int64)
        self.patches = np.asarray([num_patches(f, patch_size) for f in self.frames], dtype=np.int64)
        speakers = sorted({s.get("speaker", "") for s in self.samples} - {""})
        spk_id = {s: i for i, s in enumerate(speakers)}
        self.speaker = np.asarray([spk_id.get(s.get("speaker", ""), -1) for s in self.samples], dtype=np.int64)
        # samples of each speaker (for reference / prompt clips)
        order = np.argsort(self.speaker, kind="stable")
        bounds = np.searchsorted(self.speaker[order], np.arange(len(speakers) + 1))
        self.by_speaker = [order[bounds[i]:bounds[i + 1]] for i in range(len(speakers))]
        self.text_offsets = self.text_flat = None
        if tokenizer is not None:
            self._load_tokens(tokenizer, all_samples)

    def __len__(self) -> int:
        return len(self.samples)

    def _apply_filter(self, samples: list[dict]) -> np.ndarray:
        """Indices (ascending) of the samples passing every condition; a filter that keeps none is an error."""
        if not self.filter:
            return np.arange(len(samples), dtype=np.int64)
        cond = filter_conditions(samples, self.filter, float(self.meta.get("frame_rate_hz", 25.0)))
        keep = np.ones(len(samples), dtype=bool)
        for ok in cond.values():
            keep &= ok
        if not keep.any():
            why = ", ".join(f"{k} rejects {int((~ok).sum())}" for k, ok in cond.items())
            extra = ""
            if "min_dnsmos" in self.filter and not any(isinstance(s.get("dnsmos"), (int, float)) for s in samples):
                extra = " (no sample has a dnsmos value: were the latents encoded from metadata without one?)"
            raise ValueError(f"dataset {self.name!r} ({self.path}): filter {self.filter} keeps 0 of {len(samples)} "
                             f"samples ({why}){extra}")
        log.info("dataset %r (%s): filter %s keeps %d of %d samples", self.name, self.path, self.filter,
                 int(keep.sum()), len(samples))
        return np.flatnonzero(keep).astype(np.int64)

    def text(self, i: int) -> str:
        s = self.samples[i]
        return text_with_description(s["text"], s.get("description"))

    def _load_tokens(self, tok: TextTokenizer, all_samples: list[dict]) -> None:
        """Token ids of every sample of the folder (cached per tokenizer), then those of this subset."""
        cache = self.path / f"tokens-{tok.fingerprint()}.npz"
        offsets = flat = None
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            if len(z["offsets"]) == len(all_samples) + 1:
                offsets, flat = z["offsets"], z["ids"]
        if offsets is None:
            ids = [tok(text_with_description(s["text"], s.get("description"))) for s in all_samples]
            offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
            flat = np.asarray([t for x in ids for t in x], dtype=np.int32)
            import io
            buf = io.BytesIO()
            np.savez(buf, offsets=offsets, ids=flat)
            try:
                atomic_write_bytes(cache, buf.getvalue())
            except OSError:
                pass  # read-only dataset folder: keep in memory only
        if len(self.source_index) == len(all_samples):
            self.text_offsets, self.text_flat = offsets, flat
            return
        lens = offsets[self.source_index + 1] - offsets[self.source_index]
        self.text_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.text_flat = (np.concatenate([flat[offsets[i]:offsets[i + 1]] for i in self.source_index])
                          .astype(np.int32) if len(self.source_index) else np.zeros(0, np.int32))

    def n_text(self, i: int) -> int:
        return int(self.text_offsets[i + 1] - self.text_offsets[i])

    def text_ids(self, i: int) -> list[int]:
        return self.text_flat[self.text_offsets[i]:self.text_offsets[i + 1]].tolist()

    def latent(self, i: int) -> np.ndarray:
        """[T, 64] float16, read from its shard with one seek."""
        off, size = self.samples[i]["latent"]
        data = read_member(self.shards[self.shard_id[i]], off, size)
        z = load_npy(data)
        if z.ndim != 2 or z.shape[0] != self.frames[i]:
            raise ValueError(f"{self.shards[self.shard_id[i]]}: sample {self.samples[i]['key']} has latent "
                             f"shape {z.shape}, index says {self.frames[i]} frames")
        return z
