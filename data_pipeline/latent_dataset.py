"""A folder of latent shards (from `voxcpm-data encode`) as an indexed, random-access dataset.

Only the sidecar `*.index.json` files are read at start-up (no tar scan); a sample is one seek + read.
Texts are tokenized once per tokenizer and cached as NumPy arrays (`tokens-<fingerprint>.npz`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .sequences import num_patches, text_with_description
from .shards import atomic_write_bytes, load_npy, read_member
from .tokenizer import TextTokenizer


class LatentDataset:
    """Index arrays (length N) + `latent(i)` [T, 64] float16 + `text_ids(i)`."""

    def __init__(self, path: str | Path, tokenizer: TextTokenizer | None = None, patch_size: int = 4):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: no meta.json; run `voxcpm-data encode ... --output {self.path}`")
        self.meta = json.loads(meta_path.read_text())
        self.shards: list[Path] = []
        self.samples: list[dict] = []
        shard_ids = []
        for unit in self.meta["units"]:
            idx_path = self.path / f"{unit}.index.json"
            if not idx_path.is_file():
                raise FileNotFoundError(f"{idx_path} missing: the encode run of {self.path} is not finished")
            entries = json.loads(idx_path.read_text())["samples"]
            shard_ids += [len(self.shards)] * len(entries)
            self.shards.append(self.path / f"{unit}.tar")
            self.samples += entries
        self.shard_id = np.asarray(shard_ids, dtype=np.int32)
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
            self._load_tokens(tokenizer)

    def __len__(self) -> int:
        return len(self.samples)

    def text(self, i: int) -> str:
        s = self.samples[i]
        return text_with_description(s["text"], s.get("description"))

    def _load_tokens(self, tok: TextTokenizer) -> None:
        cache = self.path / f"tokens-{tok.fingerprint()}.npz"
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            if len(z["offsets"]) == len(self) + 1:
                self.text_offsets, self.text_flat = z["offsets"], z["ids"]
                return
        ids = [tok(self.text(i)) for i in range(len(self))]
        self.text_offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
        self.text_flat = np.asarray([t for x in ids for t in x], dtype=np.int32)
        import io
        buf = io.BytesIO()
        np.savez(buf, offsets=self.text_offsets, ids=self.text_flat)
        try:
            atomic_write_bytes(cache, buf.getvalue())
        except OSError:
            pass  # read-only dataset folder: keep in memory only

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
