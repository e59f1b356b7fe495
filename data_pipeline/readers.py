"""Readers of raw corpora. Each yields `RawSample`s (audio still encoded) or `BadSample`s (to be counted).

Supported inputs (auto-detected by `encode.plan_units` / `encode.iter_inputs`):
- Emilia-style webdataset tars: `<key>.<mp3|wav|flac|ogg>` + `<key>.json` {id, text, duration, speaker,
  language, dnsmos, ...}; extra fields are kept in `meta`.
- The official fine-tuner's JSONL manifest: one object per line {audio, text, [ref_audio], [duration],
  [ref_duration], [dataset_id], [speaker], [language], [dnsmos], [description | control | instruction]};
  relative audio paths resolve against the file.
Fields a reader does not use are listed in `RawSample.dropped` (encode counts and reports them by name).
- A folder of audio files with same-named transcripts (`x.wav` + `x.txt`), searched recursively.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from .audio import AUDIO_EXTENSIONS, BadSample

DESCRIPTION_FIELDS = ("description", "voice_description", "control", "instruction")
META_FIELDS = ("text", "speaker", "language", "id", "duration", "dnsmos", "dataset_id")   # normalize_meta's
MANIFEST_FIELDS = ("audio", "ref_audio", "ref_duration")   # read by the manifest reader (durations: measured)


@dataclass
class RawSample:
    """One utterance before decoding. `audio` is raw file bytes or a path; `meta` holds text etc."""

    key: str            # unique across all inputs: "<source name>/<sample id>"
    audio: Union[bytes, str]
    meta: dict = field(default_factory=dict)     # may hold "ref_audio": a path (manifest reference clip)
    dropped: tuple = ()                           # names of the source fields not used


def normalize_meta(raw: dict, key: str) -> dict:
    """Common metadata: text (stripped), speaker, language, duration, description, dataset_id.

    Raises BadSample("empty_text") for a missing, non-string or whitespace-only text.
    """
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadSample("empty_text", key)
    meta = {
        "text": text.strip(),
        "speaker": str(raw.get("speaker") or ""),
        "language": str(raw.get("language") or ""),
    }
    for name in DESCRIPTION_FIELDS:
        if isinstance(raw.get(name), str) and raw[name].strip():
            meta["description"] = raw[name].strip()
            break
    for name in ("id", "duration", "dnsmos", "dataset_id"):
        if name in raw:
            meta[name] = raw[name]
    return meta


def dropped_fields(raw: dict, meta: dict, also: tuple = ()) -> tuple:
    """The fields of `raw` that carry something and that neither `normalize_meta` nor the reader (`also`)
    uses: unknown fields, and description fields besides the one taken."""
    used = set(META_FIELDS) | set(also)
    taken = next((n for n in DESCRIPTION_FIELDS if isinstance(raw.get(n), str) and raw[n].strip()), None)
    out = []
    for k, v in raw.items():
        if k in used or k == taken or v is None or v == "":
            continue
        if k in DESCRIPTION_FIELDS and not (isinstance(v, str) and v.strip()):
            continue
        out.append(k)
    return tuple(sorted(out))


def _source_name(path: Path) -> str:
    return path.name.split(".")[0] if path.is_file() else path.name


def iter_emilia_tar(path: str | Path) -> Iterator[RawSample | BadSample]:
    """Members grouped by webdataset key (basename up to the first dot), in tar order."""
    path = Path(path)
    src = _source_name(path)
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        yield BadSample("unreadable_tar", str(path), str(e))
        return

    def emit(key, members):
        full_key = f"{src}/{key}"
        audio = [(ext, data) for ext, data in members.items() if ext in AUDIO_EXTENSIONS]
        if "json" not in members or not audio:
            return BadSample("missing_pair", full_key, f"members: {sorted(members)}")
        try:
            raw = json.loads(members["json"].decode("utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            return BadSample("invalid_json", full_key, str(e))
        try:
            meta = normalize_meta(raw, full_key)
        except BadSample as e:
            return e
        return RawSample(full_key, audio[0][1], meta, dropped_fields(raw, meta))

    with tar:
        cur_key, members = None, {}
        try:
            for info in tar:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                if "." not in base:
                    continue
                key = os.path.join(os.path.dirname(info.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower()
                if key != cur_key and cur_key is not None:
                    yield emit(cur_key, members)
                    members = {}
                cur_key = key
                members[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            yield BadSample("truncated_tar", str(path), str(e))
        if cur_key is not None:
            yield emit(cur_key, members)


def iter_jsonl_manifest(path: str | Path) -> Iterator[RawSample | BadSample]:
    """The official fine-tuner's manifest. A `ref_audio` path (resolved) is kept in meta (`ref_audio`);
    a missing audio or ref_audio file is a `missing_pair`."""
    path = Path(path)
    src = _source_name(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            key = f"{src}/{lineno:08d}"
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict) or not isinstance(raw.get("audio"), str):
                    raise ValueError("needs an object with an 'audio' path")
            except ValueError as e:
                yield BadSample("invalid_json", key, str(e))
                continue
            audio = raw["audio"] if os.path.isabs(raw["audio"]) else str(path.parent / raw["audio"])
            key = f"{src}/{lineno:08d}-{Path(audio).stem}"
            try:
                meta = normalize_meta(raw, key)
            except BadSample as e:
                yield e
                continue
            if isinstance(raw.get("ref_audio"), str) and raw["ref_audio"]:
                ref = raw["ref_audio"]
                meta["ref_audio"] = ref if os.path.isabs(ref) else str(path.parent / ref)
            if not os.path.isfile(audio):
                yield BadSample("missing_pair", key, f"no audio file {audio}")
                continue
            if "ref_audio" in meta and not os.path.isfile(meta["ref_audio"]):
                yield BadSample("missing_pair", key, f"no ref_audio file {meta['ref_audio']}")
                continue
            used = MANIFEST_FIELDS if "ref_audio" in meta or not raw.get("ref_audio") else ("audio", "ref_duration")
            yield RawSample(key, audio, meta, dropped_fields(raw, meta, used))


def iter_audio_folder(path: str | Path) -> Iterator[RawSample | BadSample]:
    """`x.<audio ext>` + `x.txt` (UTF-8 transcript); optional `x.json` adds speaker/language/description."""
    path = Path(path)
    src = path.name
    stems: dict[Path, dict[str, Path]] = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and "." in p.name:
            ext = p.suffix[1:].lower()
            if ext in AUDIO_EXTENSIONS or ext in ("txt", "json"):
                stems.setdefault(p.with_suffix(""), {})[ext] = p
    for stem, files in sorted(stems.items()):
        key = f"{src}/{stem.relative_to(path).as_posix()}"
        audio = [files[e] for e in AUDIO_EXTENSIONS if e in files]
        if not audio or "txt" not in files:
            if audio or "txt" in files:
                yield BadSample("missing_pair", key, f"files: {sorted(files)}")
            continue
        raw = {}
        if "json" in files:
            try:
                raw = json.loads(files["json"].read_text(encoding="utf-8"))
            except ValueError as e:
                yield BadSample("invalid_json", key, str(e))
                continue
        try:
            raw["text"] = files["txt"].read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            yield BadSample("invalid_text", key, str(e))
            continue
        try:
            meta = normalize_meta(raw, key)
        except BadSample as e:
            yield e
            continue
        yield RawSample(key, str(audio[0]), meta, dropped_fields(raw, meta))
