"""`voxcpm-data encode`: raw corpora -> AudioVAE V2 latent shards (webdataset tars), resumable.

Work is split into units: one per input tar, or `samples_per_shard` entries of a manifest / folder.
Unit i goes to rank i % world_size and becomes `DIR/<unit>.tar` (+ `.index.json`), written atomically,
so a killed run restarted with the same arguments skips finished units and produces byte-identical
shards. Bad samples are skipped, named in a log line and counted by reason in `DIR/report.json`; source
fields that are not used are counted by name (`dropped_fields`) and warned about. A manifest's
`ref_audio` is encoded with the same VAE and stored with its sample. When every unit is done, rank 0
builds the folder's columnar index (`index.npz`, and the token ids with `tokenizer_path`; index.py).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .audio import BadSample, decode_audio
from .audio_vae import AudioVAEConfig, load_audio_vae
from .index import build_folder_index
from .readers import RawSample, iter_audio_folder, iter_emilia_tar, iter_jsonl_manifest
from .shards import atomic_write_bytes, json_bytes, shard_complete, write_latent_shard

UNIT_OUTPUTS = (".tar", ".index.json", ".report.json")  # the files one unit writes into DIR

log = logging.getLogger("voxcpm_data.encode")

META_KEYS = ("text", "speaker", "language", "description", "id", "dnsmos", "dataset_id")


@dataclass
class EncodeOptions:
    min_seconds: float = 0.5
    max_seconds: float = 30.0
    batch_seconds: float = 32.0         # padded audio seconds per encoder call
    chunk_seconds: float = 1800.0       # decoded audio held in memory per unit at once
    frames_multiple: int = 4            # pad audio so T is a multiple of this (= patch size; reference packer)
    samples_per_shard: int = 2000       # for manifests / folders
    vae_config: str = "small"
    vae_path: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    tokenizer_path: str | None = None   # also store token ids in the index (tokenize at encode time)
    index_workers: int | None = None    # processes building the index (default: min(8, cores))


@dataclass
class Unit:
    name: str
    path: Path | None = None                    # an input tar, read lazily
    entries: list = field(default_factory=list)  # RawSample | BadSample, for manifests / folders

    def samples(self) -> Iterator[RawSample | BadSample]:
        return iter_emilia_tar(self.path) if self.path is not None else iter(self.entries)

    def count(self) -> int:
        """Samples in the unit (tar: number of .json members, read from headers only)."""
        if self.path is None:
            return len(self.entries)
        try:
            with tarfile.open(self.path, "r:*") as tar:
                return sum(1 for m in tar if m.name.endswith(".json"))
        except (tarfile.TarError, OSError):
            return 0


def plan_units(inputs: list[str], samples_per_shard: int) -> list[Unit]:
    """Deterministic list of units for the inputs (tars, .jsonl manifests, folders of tars or audio)."""
    units: list[Unit] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir() and sorted(p.glob("*.tar")):
            units += [Unit(t.stem, path=t) for t in sorted(p.glob("*.tar"))]
        elif p.is_file() and p.suffix == ".tar":
            units.append(Unit(p.stem, path=p))
        elif p.is_dir() or p.suffix in (".jsonl", ".json"):
            entries = list(iter_audio_folder(p) if p.is_dir() else iter_jsonl_manifest(p))
            src = p.name.split(".")[0]
            for i in range(0, max(len(entries), 1), samples_per_shard):
                units.append(Unit(f"{src}-{i // samples_per_shard:06d}", entries=entries[i:i + samples_per_shard]))
        else:
            raise FileNotFoundError(f"input {p}: expected a .tar, a .jsonl manifest or a folder")
    names = [u.name for u in units]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(f"two inputs map to the same output shard name(s) {dup}; rename one input")
    return units


def iter_inputs(inputs: list[str]) -> Iterator[RawSample | BadSample]:
    """Every sample of the inputs, in the order `encode` reads them (bad ones as `BadSample`)."""
    for unit in plan_units(inputs, samples_per_shard=1 << 30):
        yield from unit.samples()


def shard_key(key: str) -> str:
    """Sample key inside its shard: the id after the source prefix, no '/' or '.' (webdataset keys)."""
    local = key.split("/", 1)[1] if "/" in key else key
    return local.replace("/", "__").replace(".", "_")


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    try:
        import torch_npu  # noqa: F401  (registers the npu device)
        return torch.device("npu", local_rank)
    except ImportError:
        return torch.device("cpu")


class LatentEncoder:
    """Batched-by-length AudioVAE V2 encoding; the encoder is causal, so right padding leaves every
    sample's frames exactly as if encoded alone (up to float reassociation)."""

    def __init__(self, opts: EncodeOptions):
        self.opts = opts
        self.device = pick_device(opts.device)
        self.vae, self.provenance = load_audio_vae(opts.vae_path, AudioVAEConfig.preset(opts.vae_config),
                                                   with_decoder=False, seed=opts.seed, fingerprint=True)
        self.dtype = getattr(torch, opts.dtype)
        self.vae.to(self.device, self.dtype)
        self.pad_unit = self.vae.hop_length * opts.frames_multiple

    @torch.no_grad()
    def __call__(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        """[N_i] float32 16 kHz -> [T_i, 64] float16, T_i = frames_multiple * ceil(N_i / (hop * frames_multiple))."""
        order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))
        budget = int(self.opts.batch_seconds * self.vae.sample_rate)
        out: list[np.ndarray | None] = [None] * len(audios)
        i = 0
        while i < len(order):
            longest = math.ceil(len(audios[order[i]]) / self.pad_unit) * self.pad_unit
            n = max(1, min(len(order) - i, budget // longest))
            idx = order[i:i + n]
            batch = torch.zeros(n, longest)
            for row, j in enumerate(idx):
                batch[row, : len(audios[j])] = torch.from_numpy(audios[j])
            z = self.vae.encode(batch.to(self.device, self.dtype)).float().transpose(1, 2).cpu()  # [n, T, 64]
            for row, j in enumerate(idx):
                frames = math.ceil(len(audios[j]) / self.pad_unit) * self.opts.frames_multiple
                out[j] = z[row, :frames].numpy().astype(np.float16)
            i += n
        return out


class Progress(tqdm):
    """tqdm over samples that also shows audio hours done and audio hours per wall hour."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.audio_s = 0.0

    def add_audio(self, seconds: float) -> None:
        self.audio_s += seconds
        rate = self.audio_s / max(time.time() - self.start_t, 1e-9)
        self.set_postfix(audio_h=f"{self.audio_s / 3600:.3f}", audio_h_per_h=f"{rate:.2f}", refresh=False)


def encode_unit(unit: Unit, encoder: LatentEncoder, out_dir: Path, pbar: Progress) -> dict:
    """Encode one unit into `out_dir/<unit>.tar`. Returns its report {kept, skipped, seconds,
    dropped_fields: {field: samples}}."""
    opts, sr = encoder.opts, encoder.vae.sample_rate
    kept: list[tuple] = []
    skipped: Counter = Counter()
    dropped: Counter = Counter()
    seconds = 0.0
    pending: list[tuple[str, np.ndarray, dict, np.ndarray | None]] = []

    def flush():   # targets and reference clips in one length-sorted batching; a reference clip shared by
        # several rows (one per speaker, say) is encoded once
        refs = {m["ref_audio"]: r for _, _, m, r in pending if r is not None}
        latents = encoder([a for _, a, _, _ in pending] + list(refs.values()))
        ref_latent = dict(zip(refs, latents[len(pending):]))
        kept.extend((k, z, m, ref_latent[m["ref_audio"]] if r is not None else None)
                    for (k, _, m, r), z in zip(pending, latents[:len(pending)]))
        pending.clear()

    def skip(e: BadSample):
        skipped[e.reason] += 1
        log.warning("skip %s: %s%s", e.reason, e.key, f" ({e.detail})" if e.detail else "")

    for suffix in UNIT_OUTPUTS:   # leftovers of a killed run of this unit (not of a unit named `<name>.x`)
        for stale in out_dir.glob(f"{glob.escape(unit.name + suffix)}.tmp-*"):
            stale.unlink(missing_ok=True)
    pending_seconds = 0.0
    keys_seen: set[str] = set()
    for s in unit.samples():
        pbar.update(1)
        if isinstance(s, BadSample):
            skip(s)
            continue
        try:
            audio = decode_audio(s.audio, s.key, sr)
            dur = len(audio) / sr
            if dur < opts.min_seconds:
                raise BadSample("too_short", s.key, f"{dur:.2f} s < {opts.min_seconds} s")
            if dur > opts.max_seconds:
                raise BadSample("too_long", s.key, f"{dur:.2f} s > {opts.max_seconds} s")
            key = shard_key(s.key)
            if key in keys_seen:
                raise BadSample("duplicate_key", s.key)
            ref = None
            if s.meta.get("ref_audio"):
                try:
                    ref = decode_audio(s.meta["ref_audio"], s.key, sr)
                except BadSample as e:
                    raise BadSample(e.reason, s.key, f"ref_audio {s.meta['ref_audio']}: {e.detail or e.reason}") from None
        except BadSample as e:
            skip(e)
            continue
        keys_seen.add(key)
        dropped.update(s.dropped)
        meta = {k: s.meta[k] for k in META_KEYS if k in s.meta}
        meta.update(duration=round(dur, 4), source_key=s.key)
        if ref is not None:
            meta.update(ref_audio=s.meta["ref_audio"], ref_duration=round(len(ref) / sr, 4))
            pending_seconds += len(ref) / sr
        pending.append((key, audio, meta, ref))
        seconds += dur
        pending_seconds += dur
        pbar.add_audio(dur)
        if pending_seconds >= opts.chunk_seconds:
            flush()
            pending_seconds = 0.0
    if pending:
        flush()
    report = {"kept": len(kept), "skipped": dict(sorted(skipped.items())), "seconds": round(seconds, 3),
              "dropped_fields": dict(sorted(dropped.items()))}
    if dropped:
        log.warning("unit %s: source field(s) not used, dropped: %s", unit.name, _fields_text(dropped))
    write_latent_shard(out_dir / f"{unit.name}.tar", kept)
    # written last: a unit is done when its .tar, .index.json and .report.json all exist
    atomic_write_bytes(out_dir / f"{unit.name}.report.json", json_bytes(report))
    return report


def _fields_text(counts: Counter | dict) -> str:
    return ", ".join(f"{k} ({v} sample{'s' if v != 1 else ''})" for k, v in sorted(counts.items()))


RANDOM_VAE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!! encode without --vae: the latents come from a RANDOMLY INITIALISED AudioVAE (config %s, seed %d).
!!! A model trained on them cannot be used with the released VoxCPM AudioVAE. Fine for the demo and
!!! tests; for real data pass --vae /path/to/VoxCPM2/audiovae.safetensors (recorded in meta.json "vae").
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def run_encode(inputs: list[str], out_dir: str, opts: EncodeOptions, rank: int | None = None,
               world_size: int | None = None) -> dict | None:
    """Encode `inputs` into `out_dir`. Returns the aggregated report on rank 0 (None elsewhere)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if opts.vae_path is None and rank == 0:
        log.warning(RANDOM_VAE_WARNING, opts.vae_config, opts.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = plan_units(inputs, opts.samples_per_shard)
    encoder = LatentEncoder(opts)
    settings = {"format": "voxcpm-latents-v1", "sample_rate": encoder.vae.sample_rate, "frame_rate_hz":
                encoder.vae.sample_rate / encoder.vae.hop_length, "latent_dim": encoder.vae.latent_dim,
                "frames_multiple": opts.frames_multiple, "min_seconds": opts.min_seconds,
                "max_seconds": opts.max_seconds, "vae": encoder.provenance,
                "units": [u.name for u in units]}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        old, new = json.loads(meta_path.read_text()), json.loads(json_bytes(settings))
        upgrade = "fingerprint" not in (old.get("vae") or {})     # written before the VAE fingerprint was recorded
        if upgrade:
            new = dict(new, vae={k: v for k, v in new["vae"].items() if k != "fingerprint"})
        if old != new:
            raise SystemExit(f"{out}: already holds shards encoded with other settings/inputs "
                             f"(see {meta_path}); use a new output folder")
        if upgrade and rank == 0:     # same settings: record the fingerprint of the VAE the shards were encoded with
            atomic_write_bytes(meta_path, json_bytes(settings))
    elif rank == 0:
        atomic_write_bytes(meta_path, json_bytes(settings))

    mine = [u for i, u in enumerate(units) if i % world_size == rank]
    todo = [u for u in mine if not (shard_complete(out / f"{u.name}.tar") and (out / f"{u.name}.report.json").is_file())]
    log.info("rank %d/%d: %d units, %d done, %d to encode on %s (VAE %s, %s)", rank, world_size, len(mine),
             len(mine) - len(todo), len(todo), encoder.device, opts.vae_config, encoder.provenance["weights"])
    total = sum(u.count() for u in todo)
    with Progress(total=total, unit="sample", desc=f"encode[rank {rank}]", dynamic_ncols=True,
                  mininterval=1.0) as pbar:
        for u in todo:
            encode_unit(u, encoder, out, pbar)
    if rank != 0:
        return None
    deadline = time.time() + float(os.environ.get("VOXCPM_ENCODE_WAIT_S", 24 * 3600))
    while not all((out / f"{u.name}.report.json").is_file() for u in units):
        if time.time() > deadline:
            raise TimeoutError("other ranks did not finish their units")
        time.sleep(5)
    report = write_report(out, units)
    summary = build_folder_index(out, opts.tokenizer_path, opts.index_workers)
    log.info("sample index: %s", summary)
    return report


def write_report(out: Path, units: list[Unit]) -> dict:
    kept, skipped, dropped, seconds = 0, Counter(), Counter(), 0.0
    for u in units:
        rep = json.loads((out / f"{u.name}.report.json").read_text())
        kept += rep["kept"]
        skipped.update(rep["skipped"])
        dropped.update(rep.get("dropped_fields", {}))
        seconds += rep["seconds"]
    report = {"kept": kept, "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
              "hours": round(seconds / 3600, 4), "shards": [f"{u.name}.tar" for u in units],
              "dropped_fields": dict(sorted(dropped.items()))}
    atomic_write_bytes(out / "report.json", json_bytes(report))
    log.info("kept %d samples (%.3f h), skipped %s", kept, seconds / 3600, dict(skipped))
    if dropped:
        log.warning("source fields not used by training, dropped: %s", _fields_text(dropped))
    return report
