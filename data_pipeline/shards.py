"""Deterministic webdataset tar shards of latents: byte-identical output for identical content.

Per sample: `<key>.latent.npy` (float16 [T, 64], 25 Hz, NumPy format, no pickle), `<key>.json`, and
`<key>.ref.latent.npy` (float16 [R, 64]) when the sample has a reference clip of its own (manifest
`ref_audio`). Every shard `<name>.tar` has a sidecar `<name>.index.json` listing its samples with the byte
offsets of their members, from which the folder's columnar index (index.py) is built.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

TAR_MTIME = 0          # fixed header fields -> reproducible bytes
TAR_UID = TAR_GID = 0
TAR_UNAME = TAR_GNAME = ""


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to `<path>.tmp-<pid>`, fsync, rename: readers see the whole file or none."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive of (name, data) members in the given order with fixed headers (mode 0644)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            info.uid, info.gid, info.uname, info.gname = TAR_UID, TAR_GID, TAR_UNAME, TAR_GNAME
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """{member name: (byte offset of its data, size)} of a tar held in memory."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def write_latent_shard(path: str | Path, samples: list[tuple]) -> list[dict]:
    """Write `path` (.tar) and its `.index.json` atomically. samples: (key, latent [T, D] f16, meta) or
    (key, latent, meta, reference latent [R, D] f16 | None).

    Returns the index entries: meta + {key, frames, latent: [offset, size], json: [offset, size]} (+
    {ref_frames, ref_latent: [offset, size]} with a reference).
    """
    path = Path(path)
    members = []
    for key, latent, meta, *ref in samples:
        members.append((f"{key}.latent.npy", npy_bytes(latent.astype(np.float16))))
        if ref and ref[0] is not None:
            members.append((f"{key}.ref.latent.npy", npy_bytes(ref[0].astype(np.float16))))
        members.append((f"{key}.json", json_bytes(meta)))
    data = tar_bytes(members)
    offsets = member_offsets(data)
    index = []
    for key, latent, meta, *ref in samples:
        e = dict(meta, key=key, frames=int(latent.shape[0]), latent=list(offsets[f"{key}.latent.npy"]),
                 json=list(offsets[f"{key}.json"]))
        if ref and ref[0] is not None:
            e.update(ref_frames=int(ref[0].shape[0]), ref_latent=list(offsets[f"{key}.ref.latent.npy"]))
        index.append(e)
    atomic_write_bytes(path.with_suffix(".index.json"), json_bytes({"shard": path.name, "samples": index}))
    atomic_write_bytes(path, data)
    return index


def shard_complete(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.with_suffix(".index.json").is_file()


def read_member(shard: str | Path, offset: int, size: int) -> bytes:
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data
