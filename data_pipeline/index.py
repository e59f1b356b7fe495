"""The columnar sample index of a latent folder, memory-mapped read-only by every rank.

    DIR/index.npz                  one row per sample, in unit order then shard order (the order of the
                                   `<unit>.index.json` sidecars): lengths, shard + byte offsets of the
                                   latent / json / reference-latent members, duration, dnsmos, speaker and
                                   language ids, description flag, texts, keys, the by-speaker grouping
    DIR/tokens-<fingerprint>.npz   the token ids of every sample's text ("(description)text") for one
                                   tokenizer, CSR (`offsets` [N+1] int64, `ids` int32)

Both are uncompressed `.npz` files (`mapped_npz`): ranks map them with `mmap`, so one copy per node sits
in the page cache whatever the number of ranks, and start-up reads only what it touches. Built by
`voxcpm-data encode` when it finishes, or `voxcpm-data index DIR [--tokenizer PATH]` (folders encoded
before, another tokenizer); both parse the sidecars and tokenize in parallel processes. The loader
rebuilds a missing or out-of-date index itself for folders of up to `AUTO_BUILD_MAX_SAMPLES` samples and
otherwise stops with one error naming that command. Out of date: other units than `meta.json` lists, or a
sidecar whose size (or, when newer than the index, content hash) differs from the one indexed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .mapped_npz import FileBytes, NpzWriter, map_npz
from .sequences import text_with_description

log = logging.getLogger("voxcpm_data.index")

INDEX_FILE = "index.npz"
INDEX_FORMAT = "voxcpm-sample-index-v1"
AUTO_BUILD_MAX_SAMPLES = 200_000      # larger folders must be indexed with `voxcpm-data index` first
TOKEN_CHUNK = 50_000                  # samples per tokenization task
PARALLEL_MIN_BYTES = 64 << 20         # sidecars smaller than this are parsed in-process
MAX_OPEN_SHARDS = 64                  # file descriptors a process keeps open per folder
# string bytes read with pread, not mapped: random draws would otherwise leave every touched page of the
# text column (~90 B/sample, 0.9 GB at 10 M samples) in each rank's RSS; reads go through the page cache
ON_DEMAND_COLUMNS = ("text_bytes", "description_bytes", "key_bytes")


class IndexNotReady(RuntimeError):
    """The folder has no usable index (or no token ids for this tokenizer) and is too large to build one
    at start-up; the message names the command that builds it."""


def index_command(folder: Path, tokenizer_path=None) -> str:
    tok = f" --tokenizer {tokenizer_path}" if tokenizer_path else ""
    return f"voxcpm-data index {folder}{tok}"


# ---------------------------------------------------------------------------------------------------
# columns


class StringColumn:
    """UTF-8 strings stored as `offsets` [n+1] int64 into `data` (uint8 array, or `FileBytes` read on
    demand); `col[i] -> str`."""

    def __init__(self, offsets: np.ndarray, data):
        self.offsets, self.data = offsets, data

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.data[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get_many(self, idx: np.ndarray) -> list[str]:
        idx = np.asarray(idx, dtype=np.int64)
        d = self.data
        return [bytes(d[a:b]).decode("utf-8") for a, b in zip(self.offsets[idx].tolist(), self.offsets[idx + 1].tolist())]

    def range(self, start: int, end: int) -> list[str]:
        """Strings [start, end) from one contiguous read."""
        offs = self.offsets[start:end + 1].tolist()
        buf = bytes(self.data[offs[0]:offs[-1]])
        return [buf[a - offs[0]:b - offs[0]].decode("utf-8") for a, b in zip(offs[:-1], offs[1:])]


def encode_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1] int64, bytes uint8) of `strings`."""
    raw = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(raw) + 1, np.int64)
    np.cumsum([len(b) for b in raw], out=offsets[1:])
    return offsets, np.frombuffer(b"".join(raw), np.uint8).copy()


def _concat_strings(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    shift, offs = 0, [np.zeros(1, np.int64)]
    for o, _ in parts:
        offs.append(o[1:] + shift)
        shift += int(o[-1])
    return np.concatenate(offs), np.concatenate([d for _, d in parts] or [np.zeros(0, np.uint8)])


def _number(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def read_unit(folder: str, unit: str, frame_rate: float) -> dict:
    """Columns of one unit's sidecar `<unit>.index.json` (runs in a worker process)."""
    path = Path(folder) / f"{unit}.index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the encode run of {folder} is not finished")
    raw = path.read_bytes()
    entries = json.loads(raw)["samples"]
    n = len(entries)
    zero = (0, 0)
    # one pass per group of fields (list comprehensions, then one array each)
    nums = np.array([(e["frames"], e["latent"][0], e["latent"][1], e["json"][0], e["json"][1],
                      e.get("ref_frames", 0), *e.get("ref_latent", zero)) for e in entries],
                    dtype=np.int64).reshape(n, 8)
    floats = np.array([(_number(e.get("duration")), _number(e.get("dnsmos"))) for e in entries],
                      dtype=np.float64).reshape(n, 2)
    speakers = [str(e.get("speaker") or "") for e in entries]
    languages = [str(e.get("language") or "") for e in entries]
    descriptions = [str(e.get("description") or "") for e in entries]
    spk_names, spk_code = np.unique(np.asarray(speakers, dtype=object).astype(str), return_inverse=True) \
        if n else (np.zeros(0, str), np.zeros(0, np.int64))
    lang_names, lang_code = np.unique(np.asarray(languages, dtype=object).astype(str), return_inverse=True) \
        if n else (np.zeros(0, str), np.zeros(0, np.int64))
    frames = nums[:, 0].astype(np.int32)
    dur = np.where(np.isnan(floats[:, 0]), frames / frame_rate, floats[:, 0])
    return {
        "unit": unit, "samples": n, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
        "frames": frames, "duration": dur, "dnsmos": floats[:, 1].copy(),
        "latent_offset": nums[:, 1].copy(), "latent_size": nums[:, 2].copy(),
        "json_offset": nums[:, 3].copy(), "json_size": nums[:, 4].copy(),
        "ref_frames": nums[:, 5].astype(np.int32), "ref_offset": nums[:, 6].copy(), "ref_size": nums[:, 7].copy(),
        "has_description": np.array([bool(d.strip()) for d in descriptions], bool).reshape(n),
        "speaker_code": spk_code.astype(np.int32).reshape(n), "speaker_names": [str(x) for x in spk_names],
        "language_code": lang_code.astype(np.int32).reshape(n), "language_names": [str(x) for x in lang_names],
        "text": encode_strings([e["text"] for e in entries]),
        "description": encode_strings(descriptions),
        "key": encode_strings([e["key"] for e in entries]),
    }


def _read_unit_task(args):
    return read_unit(*args)


def _pool(workers: int):
    import multiprocessing as mp
    return mp.get_context("spawn").Pool(workers)


def build_index_arrays(folder: str | Path, workers: int = 1, progress: bool = False) -> dict[str, np.ndarray]:
    """Parse every sidecar of `folder` (in `workers` processes) into the index's arrays."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    units, fr = list(meta["units"]), float(meta.get("frame_rate_hz", 25.0))
    tasks = [(str(folder), u, fr) for u in units]
    t0 = time.time()
    if workers > 1 and len(units) > 1:
        with _pool(min(workers, len(units))) as pool:
            parts = []
            for k, p in enumerate(pool.imap(_read_unit_task, tasks, chunksize=max(1, len(tasks) // (64 * workers)))):
                parts.append(p)
                if progress and (k + 1) % max(1, len(tasks) // 20) == 0:
                    log.info("index %s: %d/%d units read (%.0f s)", folder, k + 1, len(tasks), time.time() - t0)
    else:
        parts = [read_unit(*t) for t in tasks]
    n = sum(p["samples"] for p in parts)
    speakers = sorted(set().union(*[p["speaker_names"] for p in parts]) - {""}) if parts else []
    languages = sorted(set().union(*[p["language_names"] for p in parts])) if parts else []
    spk_id = {s: i for i, s in enumerate(speakers)}
    lang_id = {s: i for i, s in enumerate(languages)}
    speaker = np.concatenate([np.asarray([spk_id.get(s, -1) for s in p["speaker_names"]], np.int32)[p["speaker_code"]]
                              if p["samples"] else np.zeros(0, np.int32) for p in parts] or [np.zeros(0, np.int32)])
    language = np.concatenate([np.asarray([lang_id[s] for s in p["language_names"]], np.int16)[p["language_code"]]
                               if p["samples"] else np.zeros(0, np.int16) for p in parts] or [np.zeros(0, np.int16)])
    cat = lambda k, dt: np.concatenate([p[k] for p in parts]).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    arrays = {
        "shard": np.repeat(np.arange(len(parts), dtype=np.int32), [p["samples"] for p in parts]),
        "frames": cat("frames", np.int32), "duration": cat("duration", np.float64),
        "dnsmos": cat("dnsmos", np.float64), "speaker": speaker, "language": language,
        "has_description": cat("has_description", bool),
        "latent_offset": cat("latent_offset", np.int64), "latent_size": cat("latent_size", np.int64),
        "json_offset": cat("json_offset", np.int64), "json_size": cat("json_size", np.int64),
        "ref_frames": cat("ref_frames", np.int32), "ref_offset": cat("ref_offset", np.int64),
        "ref_size": cat("ref_size", np.int64),
    }
    for col in ("text", "description", "key"):
        arrays[f"{col}_offsets"], arrays[f"{col}_bytes"] = _concat_strings([p[col] for p in parts])
    arrays["speaker_name_offsets"], arrays["speaker_name_bytes"] = encode_strings(speakers)
    # samples with a speaker, grouped by speaker id, ascending sample index within a group
    order = np.argsort(speaker, kind="stable").astype(np.int32)
    order = order[int(np.searchsorted(speaker[order], 0)):]
    arrays["speaker_order"] = order
    arrays["speaker_bounds"] = np.searchsorted(speaker[order], np.arange(len(speakers) + 1)).astype(np.int64)
    unit_rec = [{"name": p["unit"], "samples": p["samples"], "bytes": p["bytes"], "sha256": p["sha256"]} for p in parts]
    digest = hashlib.sha256(json.dumps([INDEX_FORMAT, unit_rec], sort_keys=True).encode()).hexdigest()
    header = {"format": INDEX_FORMAT, "samples": n, "speakers": len(speakers), "languages": languages,
              "frame_rate_hz": fr, "units": unit_rec, "digest": digest,
              "has_references": bool((arrays["ref_frames"] > 0).any())}
    arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    return arrays


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with NpzWriter(path) as w:
        for k in sorted(arrays):
            w.add(k, arrays[k])


# ---------------------------------------------------------------------------------------------------
# the mapped index


class SampleIndex:
    """The index of one folder: column arrays (read-only views of the mapped `index.npz`, or in memory for
    a read-only folder), string columns, and reads of shard members through cached file descriptors.

    Columns (length N): frames, duration (s), dnsmos (NaN: none), speaker (-1: none), language (id into
    `languages`), has_description, shard (unit id), latent/json/ref offsets and sizes (bytes), ref_frames
    (0: no reference of its own). `speaker_order` / `speaker_bounds`: the samples of speaker s are
    `speaker_order[speaker_bounds[s]:speaker_bounds[s + 1]]`, ascending."""

    COLUMNS = ("frames", "duration", "dnsmos", "speaker", "language", "has_description", "shard",
               "latent_offset", "latent_size", "json_offset", "json_size", "ref_frames", "ref_offset",
               "ref_size", "speaker_order", "speaker_bounds")

    def __init__(self, folder: str | Path, arrays: dict[str, np.ndarray], file: Path | None = None):
        self.folder, self.file = Path(folder), file
        self.header = json.loads(bytes(arrays["header"]).decode())
        if self.header.get("format") != INDEX_FORMAT:
            raise ValueError(f"{self.folder}/{INDEX_FILE}: format {self.header.get('format')!r}, expected {INDEX_FORMAT}")
        self.n = int(self.header["samples"])
        self.digest = self.header["digest"]
        self.units = [u["name"] for u in self.header["units"]]
        self.shards = [self.folder / f"{u}.tar" for u in self.units]
        self.languages: list[str] = self.header["languages"]
        self.num_speakers = int(self.header["speakers"])
        self.has_references = bool(self.header.get("has_references"))
        for c in self.COLUMNS:
            setattr(self, c, arrays[c])
        self.text = StringColumn(arrays["text_offsets"], arrays["text_bytes"])
        self.description = StringColumn(arrays["description_offsets"], arrays["description_bytes"])
        self.key = StringColumn(arrays["key_offsets"], arrays["key_bytes"])
        self.speaker_names = StringColumn(arrays["speaker_name_offsets"], arrays["speaker_name_bytes"])
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        self.sidecar_stats: tuple | None = None      # what open_index validated it against

    def __len__(self) -> int:
        return self.n

    def __reduce__(self):          # a spawned worker maps the file again instead of receiving a copy
        return (open_index, (str(self.folder),))

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of shard `shard` (one pread on a cached descriptor)."""
        if os.getpid() != self._pid:           # a forked worker: its own descriptors
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY)
            self._fds[shard] = fd
            if len(self._fds) > MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.shards[shard]}: short read at offset {offset} ({len(data)} of {size} bytes)")
        return data

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass


def index_status(folder: Path, header: dict | None, index_mtime_ns: int = 0) -> str | None:
    """Why the index `header` does not describe `folder` (None: it does)."""
    if header is None:
        return f"no {INDEX_FILE} (folder encoded before the columnar index)"
    if header.get("format") != INDEX_FORMAT:
        return f"{INDEX_FILE} has format {header.get('format')!r}, expected {INDEX_FORMAT}"
    meta = json.loads((folder / "meta.json").read_text())
    units = header["units"]
    if [u["name"] for u in units] != list(meta["units"]):
        return "its unit list differs from meta.json"
    changed = []
    for u in units:
        side = folder / f"{u['name']}.index.json"
        try:
            st = side.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{side} missing: the encode run of {folder} is not finished") from None
        if st.st_size != u["bytes"] or (st.st_mtime_ns > index_mtime_ns
                                        and hashlib.sha256(side.read_bytes()).hexdigest() != u["sha256"]):
            changed.append(u["name"])
    if changed:
        return f"{len(changed)} sidecar(s) changed since it was built ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''})"
    return None


def _read_header(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        arrays = map_npz(file)
        return json.loads(bytes(arrays["header"]).decode())
    except (ValueError, KeyError, OSError) as e:
        log.warning("%s unreadable (%s): rebuilding", file, e)
        return {"format": "unreadable"}


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _count_samples(folder: Path) -> int:
    """Samples of a folder without a usable index (from the unit reports; sidecar sizes as a fallback)."""
    meta = json.loads((folder / "meta.json").read_text())
    n = 0
    for u in meta["units"]:
        rep = folder / f"{u}.report.json"
        if rep.is_file():
            n += int(json.loads(rep.read_text()).get("kept", 0))
        elif (folder / f"{u}.index.json").is_file():
            n += (folder / f"{u}.index.json").stat().st_size // 200
    return n


_INDEXES: "weakref.WeakValueDictionary[tuple, SampleIndex]" = weakref.WeakValueDictionary()


def _sidecar_stats(folder: Path, units: list[str]) -> tuple:
    out = []
    for u in units:
        try:
            st = (folder / f"{u}.index.json").stat()
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


@contextlib.contextmanager
def build_lock(folder: Path):
    """An exclusive `flock` on `folder/.build.lock` (index and token builds of small folders)."""
    with open(Path(folder) / ".build.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def open_index(folder: str | Path, auto_build_max: int | None = None) -> SampleIndex:
    """The mapped index of `folder` (one per folder and process, shared by its datasets). A missing or
    out-of-date index is rebuilt when the folder holds <= `auto_build_max` samples, else `IndexNotReady`."""
    folder = Path(folder).resolve()
    auto_build_max = AUTO_BUILD_MAX_SAMPLES if auto_build_max is None else auto_build_max
    file = folder / INDEX_FILE
    st = file.stat() if file.is_file() else None
    key = (str(folder), st.st_ino, st.st_size, st.st_mtime_ns) if st else None
    cached = _INDEXES.get(key) if key is not None else None
    if cached is not None and cached.sidecar_stats == _sidecar_stats(folder, cached.units):
        return cached                   # validated in this process, sidecars untouched since
    reason = index_status(folder, _read_header(file), st.st_mtime_ns if st else 0)
    if reason is None:
        ix = SampleIndex(folder, map_npz(file, read_on_demand=ON_DEMAND_COLUMNS), file)
        if isinstance(ix.text.data, FileBytes):     # continuation draws read texts at random from the start
            ix.text.data.warm_page_cache()
        ix.sidecar_stats = _sidecar_stats(folder, ix.units)
        _INDEXES[key] = ix
        return ix
    n = _count_samples(folder)
    if n > auto_build_max:
        raise IndexNotReady(f"{folder}: no usable sample index: {reason}. Build it once (parallel, "
                            f"~minutes for millions of samples) with `{index_command(folder)} "
                            f"--tokenizer <data.tokenizer_path>` before training")
    if _writable(folder):
        with build_lock(folder):    # the ranks of a node start together: one builds, the others wait
            st = file.stat() if file.is_file() else None
            reason = index_status(folder, _read_header(file), st.st_mtime_ns if st else 0)
            if reason is not None:
                log.info("%s: %s; building the sample index (%d samples)", folder, reason, n)
                write_arrays(file, build_index_arrays(folder))
        return open_index(folder, auto_build_max)
    log.info("%s: %s; building the sample index (%d samples)", folder, reason, n)
    arrays = build_index_arrays(folder)
    log.warning("%s is read-only: sample index kept in memory (run `%s` where it is writable)", folder,
                index_command(folder))
    return SampleIndex(folder, arrays)


# ---------------------------------------------------------------------------------------------------
# token ids


def tokens_file(folder: Path, fingerprint: str) -> Path:
    return Path(folder) / f"tokens-{fingerprint}.npz"


class TokenStore:
    """Token ids of every sample of an index: `ids[offsets[g]:offsets[g + 1]]` (mapped, read-only)."""

    def __init__(self, arrays: dict[str, np.ndarray], fingerprint: str):
        self.offsets, self.ids, self.fingerprint = arrays["offsets"], arrays["ids"], fingerprint

    def counts(self, g) -> np.ndarray:
        g = np.asarray(g)
        return self.offsets[g + 1] - self.offsets[g]

    def get(self, g: int) -> np.ndarray:
        return self.ids[self.offsets[g]:self.offsets[g + 1]]


_TOKENIZERS: dict = {}


def _tokenize_range(args) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int32, ids int32) of samples [start, end) of the folder's index (in a worker process)."""
    folder, tokenizer_path, start, end = args
    from .tokenizer import TextTokenizer

    tok = _TOKENIZERS.get(tokenizer_path)
    if tok is None:
        tok = _TOKENIZERS[tokenizer_path] = TextTokenizer(tokenizer_path)
    ix = open_index(folder, auto_build_max=0)
    return tokenize_samples(ix, tok, start, end)


def tokenize_samples(ix: SampleIndex, tok, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    texts = [text_with_description(t, ix.description[g] if ix.has_description[g] else None)
             for g, t in zip(range(start, end), ix.text.range(start, end))]
    ids = tok.batch(texts)
    lengths = np.fromiter((len(x) for x in ids), np.int32, len(ids))
    flat = np.fromiter((t for x in ids for t in x), np.int32, int(lengths.sum()))
    return lengths, flat


def build_tokens(ix: SampleIndex, tok, workers: int = 1, path: Path | None = None, progress: bool = False):
    """Tokenize every sample of `ix` with `tok` (a TextTokenizer) in `workers` processes; write
    `tokens-<fingerprint>.npz` to `path` (default: the folder). Returns the arrays when `path` is False."""
    fp = tok.fingerprint()
    chunks = [(s, min(s + TOKEN_CHUNK, ix.n)) for s in range(0, ix.n, TOKEN_CHUNK)]
    t0 = time.time()
    with tempfile.TemporaryFile(dir=ix.folder if _writable(ix.folder) else None) as raw:
        lengths = []

        def take(res, k):
            lengths.append(res[0])
            raw.write(memoryview(np.ascontiguousarray(res[1])).cast("B"))
            if progress and (k + 1) % max(1, len(chunks) // 20) == 0:
                done = chunks[k][1]
                rate = done / max(time.time() - t0, 1e-9)
                log.info("tokens %s: %d/%d samples (%.0f/s, ETA %.0f s)", ix.folder, done, ix.n, rate,
                         (ix.n - done) / max(rate, 1e-9))

        if workers > 1 and len(chunks) > 1:
            with _pool(min(workers, len(chunks))) as pool:
                for k, res in enumerate(pool.imap(_tokenize_range, [(str(ix.folder), str(tok.path), a, b)
                                                                    for a, b in chunks])):
                    take(res, k)
        else:
            for k, (a, b) in enumerate(chunks):
                take(tokenize_samples(ix, tok, a, b), k)
        lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        offsets = np.zeros(ix.n + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        total = int(offsets[-1])
        header = np.frombuffer(json.dumps({"fingerprint": fp, "tokenizer": str(tok.path), "index_digest": ix.digest},
                                          sort_keys=True).encode(), np.uint8)
        raw.flush()

        def ids_chunks():
            raw.seek(0)
            step = 1 << 24
            left = total
            while left > 0:
                k = min(step, left)
                buf = raw.read(4 * k)
                yield np.frombuffer(buf, np.int32)
                left -= k

        if path is False:
            return {"offsets": offsets, "ids": np.concatenate(list(ids_chunks()) or [np.zeros(0, np.int32)]),
                    "header": header}
        out = path or tokens_file(ix.folder, fp)
        with NpzWriter(out) as w:
            w.add("header", header)
            w.add("offsets", offsets)
            w.add_chunks("ids", np.int32, (total,), ids_chunks())
    log.info("tokens %s: %d samples, %d ids (tokenizer %s) in %.1f s", ix.folder, ix.n, total, fp, time.time() - t0)
    return out


def _token_status(ix: SampleIndex, arrays: dict) -> str | None:
    if "header" in arrays:                          # written by build_tokens
        h = json.loads(bytes(arrays["header"]).decode())
        if h.get("index_digest") != ix.digest:
            return "they were built for another version of the index"
    if len(arrays["offsets"]) != ix.n + 1:          # (also a cache of the pre-index loader)
        return f"they cover {len(arrays['offsets']) - 1} samples, the index {ix.n}"
    return None


def _read_tokens(ix: SampleIndex, file: Path, tok) -> tuple[dict | None, str | None]:
    """(mapped arrays, None) of a usable token file, else (None, why not)."""
    if not file.is_file():
        return None, f"no {file.name} (token ids for tokenizer {tok.path})"
    try:
        arrays = map_npz(file)
        reason = _token_status(ix, arrays)
    except (ValueError, KeyError, OSError) as e:
        reason = f"{file.name} unreadable ({e})"
    return (arrays, None) if reason is None else (None, f"{file.name} is out of date: {reason}")


_TOKEN_STORES: "weakref.WeakValueDictionary[tuple, TokenStore]" = weakref.WeakValueDictionary()


def open_tokens(ix: SampleIndex, tok, auto_build_max: int | None = None) -> TokenStore:
    """The token ids of `ix` for tokenizer `tok`; built when missing or stale if the folder is small
    (<= `auto_build_max` samples), else `IndexNotReady` naming the command."""
    auto_build_max = AUTO_BUILD_MAX_SAMPLES if auto_build_max is None else auto_build_max
    fp = tok.fingerprint()
    file = tokens_file(ix.folder, fp)
    key = (str(ix.folder), ix.digest, fp)
    if key in _TOKEN_STORES:
        return _TOKEN_STORES[key]
    arrays, reason = _read_tokens(ix, file, tok)
    if reason is None:
        store = _TOKEN_STORES[key] = TokenStore(arrays, fp)
        return store
    if ix.n > auto_build_max:
        others = sorted(p.name for p in ix.folder.glob("tokens-*.npz") if p != file)
        raise IndexNotReady(f"{ix.folder}: {reason}; the folder holds token ids for {others or 'no tokenizer'}. "
                            f"Data tokenized for another tokenizer cannot be used: run "
                            f"`{index_command(ix.folder, tok.path)}` once before training")
    if _writable(ix.folder):
        with build_lock(ix.folder):     # one rank of the node tokenizes, the others wait
            reason = _read_tokens(ix, file, tok)[1]
            if reason is not None:
                log.info("%s: %s; tokenizing %d samples", ix.folder, reason, ix.n)
                build_tokens(ix, tok)
        return open_tokens(ix, tok, auto_build_max)
    log.info("%s: %s; tokenizing %d samples", ix.folder, reason, ix.n)
    log.warning("%s is read-only: token ids kept in memory (run `%s` where it is writable)", ix.folder,
                index_command(ix.folder, tok.path))
    store = _TOKEN_STORES[key] = TokenStore(build_tokens(ix, tok, path=False), fp)
    return store


def open_tokens_file(ix: SampleIndex, fingerprint: str) -> TokenStore:
    """The token store of tokenizer `fingerprint` as the folder holds it (no building; a worker process
    reopening what its parent validated)."""
    key = (str(ix.folder), ix.digest, fingerprint)
    if key in _TOKEN_STORES:
        return _TOKEN_STORES[key]
    arrays = map_npz(tokens_file(ix.folder, fingerprint))
    reason = _token_status(ix, arrays)
    if reason is not None:
        raise IndexNotReady(f"{tokens_file(ix.folder, fingerprint)}: {reason}")
    store = _TOKEN_STORES[key] = TokenStore(arrays, fingerprint)
    return store


# ---------------------------------------------------------------------------------------------------
# `voxcpm-data index`


def build_folder_index(folder: str | Path, tokenizer_path: str | None = None, workers: int | None = None,
                       force: bool = False) -> dict:
    """Build (or refresh) `index.npz` and, with a tokenizer, its `tokens-<fingerprint>.npz`. Returns a
    summary {samples, speakers, index_s, tokens_s, ...}."""
    folder = Path(folder).resolve()
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder}: no meta.json; it is not a folder written by `voxcpm-data encode`")
    workers = workers or min(8, os.cpu_count() or 1)
    units = json.loads((folder / "meta.json").read_text())["units"]
    sidecar_bytes = sum((folder / f"{u}.index.json").stat().st_size for u in units
                        if (folder / f"{u}.index.json").is_file())
    if sidecar_bytes < PARALLEL_MIN_BYTES:
        workers = 1                 # a small folder: starting processes costs more than it saves
    file = folder / INDEX_FILE
    t0 = time.time()
    st = file.stat() if file.is_file() else None
    reason = "forced" if force else index_status(folder, _read_header(file), st.st_mtime_ns if st else 0)
    if reason is not None:
        log.info("index %s: building (%s) with %d processes", folder, reason, workers)
        write_arrays(file, build_index_arrays(folder, workers, progress=True))
    elif st is not None and any((folder / f"{u}.index.json").stat().st_mtime_ns > st.st_mtime_ns for u in units):
        os.utime(file)              # content verified unchanged: record it (start-up skips the hashing)
    ix = open_index(folder, auto_build_max=0)
    t1 = time.time()
    out = {"folder": str(folder), "samples": ix.n, "speakers": ix.num_speakers, "languages": ix.languages,
           "with_reference": int((ix.ref_frames > 0).sum()), "index_s": round(t1 - t0, 2), "rebuilt": reason is not None}
    if tokenizer_path:
        from .tokenizer import TextTokenizer

        tok = TextTokenizer(tokenizer_path)
        tf = tokens_file(folder, tok.fingerprint())
        stale = True
        if tf.is_file() and not force:
            try:
                stale = _token_status(ix, map_npz(tf)) is not None
            except (ValueError, KeyError, OSError):
                stale = True
        if stale:
            build_tokens(ix, tok, workers, progress=True)
        out.update(tokens=tf.name, tokens_s=round(time.time() - t1, 2), tokens_rebuilt=stale)
    return out
