"""A folder of latent shards (from `voxcpm-data encode`) as an indexed, random-access dataset.

The folder's columnar index (`index.py`: `index.npz` + `tokens-<fingerprint>.npz`, memory-mapped and shared
by every dataset on that folder in the process, and through the page cache by every process) is all that
start-up reads; a sample is one pread. A `SampleFilter` (config.py) restricts the dataset to a subset of
the folder's samples, evaluated on the columns: everything below (indices, speakers, reference clips) sees
only that subset.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

from .config import SampleFilter, to_dict
from .index import SampleIndex, TokenStore, open_index, open_tokens, open_tokens_file
from .sequences import num_patches, text_with_description
from .shards import load_npy
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


def filter_conditions(ix: SampleIndex, flt: dict) -> dict[str, np.ndarray]:
    """Per set condition of the canonical filter `flt`, a bool array over the folder's samples: which pass."""
    cond: dict[str, np.ndarray] = {}
    if "min_dnsmos" in flt:
        with np.errstate(invalid="ignore"):
            cond["min_dnsmos"] = ix.dnsmos >= flt["min_dnsmos"]          # NaN (no dnsmos) fails
    if flt.get("require_description"):
        cond["require_description"] = np.asarray(ix.has_description, dtype=bool)
    if "languages" in flt:
        keep = set(flt["languages"])
        ok = np.asarray([lang.strip().lower() in keep for lang in ix.languages], dtype=bool)
        cond["languages"] = ok[ix.language] if len(ok) else np.zeros(ix.n, bool)
    if "min_duration" in flt:
        cond["min_duration"] = ix.duration >= flt["min_duration"]
    if "max_duration" in flt:
        cond["max_duration"] = ix.duration <= flt["max_duration"]
    return cond


class SpeakerGroups:
    """`groups[s]`: the (dataset) indices of speaker s's samples, ascending; CSR over `order` / `bounds`."""

    def __init__(self, order: np.ndarray, bounds: np.ndarray):
        self.order, self.bounds = order, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, s: int) -> np.ndarray:
        return self.order[self.bounds[s]:self.bounds[s + 1]]

    def __iter__(self):
        return (self[s] for s in range(len(self)))


class SampleRecords:
    """`samples[i]`: sample i's metadata as its sidecar entry held it (its `<key>.json` member, read from
    the shard, + key, frames, latent / json [offset, size], and ref_frames / ref_latent when it has a
    reference). For inspection and tests; training reads the columns."""

    def __init__(self, ds: "LatentDataset"):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        ds, ix = self.ds, self.ds.index
        if not -len(ds) <= i < len(ds):
            raise IndexError(i)
        g = ds.global_index(i % len(ds))
        shard = int(ix.shard[g])
        meta = json.loads(ix.read(shard, int(ix.json_offset[g]), int(ix.json_size[g])))
        rec = dict(meta, key=ix.key[g], frames=int(ix.frames[g]),
                   latent=[int(ix.latent_offset[g]), int(ix.latent_size[g])],
                   json=[int(ix.json_offset[g]), int(ix.json_size[g])])
        if ix.ref_frames[g] > 0:
            rec.update(ref_frames=int(ix.ref_frames[g]), ref_latent=[int(ix.ref_offset[g]), int(ix.ref_size[g])])
        return rec

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _reopen_dataset(path, patch_size, flt, name, fingerprint):
    ds = LatentDataset(path, None, patch_size, filter=flt, name=name)
    if fingerprint is not None:
        ds.tokens = open_tokens_file(ds.index, fingerprint)
    return ds


class LatentDataset:
    """Per-sample arrays (length N of the subset) + `latent(i)` [T, 64] float16 + `text_ids(i)`.

    `filter` (a `SampleFilter` spec) keeps a deterministic subset of the folder, in index order; `name`
    only labels error messages. `source_index[i]` is sample i's position in the unfiltered folder. Arrays:
    `frames`, `patches`, `speaker` (folder speaker id, -1: none), `shard_id`, `has_description`,
    `ref_patches` (patches of the sample's own reference clip, 0: none); `by_speaker[s]`: the samples of
    speaker s. Unfiltered, these are views of the mapped index (no copy); filtered, gathered once."""

    def __init__(self, path: str | Path, tokenizer: TextTokenizer | None = None, patch_size: int = 4,
                 filter=None, name: str | None = None):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: no meta.json; run `voxcpm-data encode ... --output {self.path}`")
        self.meta = json.loads(meta_path.read_text())
        self.name = name or self.path.name
        self.filter = canonical_filter(filter, self.name)
        self.index: SampleIndex = open_index(self.path)
        ix = self.index
        self.shards: list[Path] = ix.shards
        self.source_size = ix.n
        self._gidx = self._apply_filter()                 # None: every sample of the folder
        take = (lambda a: a) if self._gidx is None else (lambda a: a[self._gidx])
        self.frames = take(ix.frames)
        self.patches = num_patches(self.frames.astype(np.int64), patch_size).astype(np.int32)
        self.speaker = take(ix.speaker)
        self.shard_id = take(ix.shard)
        self.has_description = take(ix.has_description)
        self.ref_patches = (num_patches(take(ix.ref_frames).astype(np.int64), patch_size).astype(np.int32)
                            if ix.has_references else None)
        self.by_speaker = SpeakerGroups(*self._speaker_groups())
        self.samples = SampleRecords(self)
        self.tokens: TokenStore | None = open_tokens(ix, tokenizer) if tokenizer is not None else None
        self._args = (str(self.path), patch_size, self.filter, self.name)

    def __reduce__(self):
        """Pickled (a spawned loader worker) as its arguments: the receiver maps the folder's files again
        instead of receiving copies of the arrays."""
        return (_reopen_dataset, (*self._args, self.tokens.fingerprint if self.tokens is not None else None))

    def __len__(self) -> int:
        return self.source_size if self._gidx is None else len(self._gidx)

    @property
    def source_index(self) -> np.ndarray:
        return np.arange(self.source_size, dtype=np.int64) if self._gidx is None else self._gidx

    def global_index(self, i):
        """Position(s) in the folder's index of dataset sample(s) `i` (int or array)."""
        return i if self._gidx is None else self._gidx[i]

    def _apply_filter(self) -> np.ndarray | None:
        """Indices (ascending) of the samples passing every condition (None: no filter); a filter that keeps
        none is an error."""
        if not self.filter:
            return None
        ix = self.index
        cond = filter_conditions(ix, self.filter)
        keep = np.ones(ix.n, dtype=bool)
        for ok in cond.values():
            keep &= ok
        if not keep.any():
            why = ", ".join(f"{k} rejects {int((~ok).sum())}" for k, ok in cond.items())
            extra = ""
            if "min_dnsmos" in self.filter and np.isnan(ix.dnsmos).all():
                extra = " (no sample has a dnsmos value: were the latents encoded from metadata without one?)"
            raise ValueError(f"dataset {self.name!r} ({self.path}): filter {self.filter} keeps 0 of {ix.n} "
                             f"samples ({why}){extra}")
        log.info("dataset %r (%s): filter %s keeps %d of %d samples", self.name, self.path, self.filter,
                 int(keep.sum()), ix.n)
        idx = np.flatnonzero(keep)
        return idx.astype(np.int32 if ix.n < 2 ** 31 else np.int64)

    def _speaker_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds) over dataset indices: speaker s's samples are order[bounds[s]:bounds[s + 1]]."""
        ix = self.index
        if self._gidx is None:
            return ix.speaker_order, ix.speaker_bounds
        keep = np.zeros(ix.n, bool)
        keep[self._gidx] = True
        local = np.cumsum(keep, dtype=np.int64) - 1
        so = ix.speaker_order[keep[ix.speaker_order]]
        order = local[so].astype(self._gidx.dtype)
        bounds = np.searchsorted(ix.speaker[so], np.arange(ix.num_speakers + 1)).astype(np.int64)
        return order, bounds

    # -- text -----------------------------------------------------------------------------------------
    def key(self, i: int) -> str:
        return self.index.key[self.global_index(i)]

    def plain_text(self, i: int) -> str:
        """The transcript alone (continuation prompts join these)."""
        return self.index.text[self.global_index(i)]

    def text(self, i: int) -> str:
        """The text the model reads: "(description)transcript" for voice-design samples."""
        g = self.global_index(i)
        ix = self.index
        return text_with_description(ix.text[g], ix.description[g] if ix.has_description[g] else None)

    def _need_tokens(self) -> TokenStore:
        if self.tokens is None:
            raise RuntimeError(f"dataset {self.name!r}: built without a tokenizer")
        return self.tokens

    def n_text(self, i):
        """Token count(s) of `text(i)` (int or array)."""
        c = self._need_tokens().counts(self.global_index(i))
        return int(c) if np.ndim(c) == 0 else c

    def text_ids(self, i: int) -> list[int]:
        return self._need_tokens().get(self.global_index(i)).tolist()

    def plain_texts(self, idx: np.ndarray) -> list[str]:
        """`[plain_text(i) for i in idx]`."""
        return self.index.text.get_many(self.global_index(np.asarray(idx)))

    @property
    def text_offsets(self) -> np.ndarray:
        """[N + 1] token offsets of this subset (computed on demand; `text_ids` reads the folder's store)."""
        counts = self._need_tokens().counts(self.source_index)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # -- latents --------------------------------------------------------------------------------------
    def _read_latent(self, g: int, offset: int, size: int, frames: int, what: str) -> np.ndarray:
        ix = self.index
        shard = int(ix.shard[g])
        z = load_npy(ix.read(shard, offset, size))
        if z.ndim != 2 or z.shape[0] != frames:
            raise ValueError(f"{ix.shards[shard]}: sample {ix.key[g]} has {what} shape {z.shape}, index says "
                             f"{frames} frames")
        return z

    def latent(self, i: int) -> np.ndarray:
        """[T, 64] float16, read from its shard with one pread."""
        g, ix = self.global_index(i), self.index
        return self._read_latent(g, int(ix.latent_offset[g]), int(ix.latent_size[g]), int(ix.frames[g]), "latent")

    def ref_latent(self, i: int) -> np.ndarray:
        """[R, 64] float16: the sample's own reference clip (its manifest `ref_audio`)."""
        g, ix = self.global_index(i), self.index
        if ix.ref_frames[g] <= 0:
            raise ValueError(f"sample {ix.key[g]} of {self.path} has no reference clip of its own")
        return self._read_latent(g, int(ix.ref_offset[g]), int(ix.ref_size[g]), int(ix.ref_frames[g]),
                                 "reference latent")
