"""Readers + `voxcpm-data encode`: bad samples skipped and counted, resample/downmix, killed run resumed
byte-identically, inspect, shards readable by webdataset."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.encode import EncodeOptions, run_encode
from data_pipeline.shards import load_npy, tar_bytes

REPO = Path(__file__).resolve().parents[1]
DEMO_TARS = sorted((REPO / "demo_data" / "emilia").glob("*.tar"))


def _demo_members(n):
    """First n (key, audio ext, audio bytes, meta) of the demo corpus."""
    out = []
    with tarfile.open(DEMO_TARS[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in sorted(members):
        if name.endswith(".json"):
            key = name[:-5]
            ext = next(e for e in ("ogg", "mp3", "flac") if f"{key}.{e}" in members)
            out.append((key, ext, members[f"{key}.{ext}"], json.loads(members[name])))
        if len(out) == n:
            break
    return out


def _wav(audio, sr, subtype="PCM_16"):
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def _tone(seconds, sr, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([x, 0.5 * x], 1) if channels == 2 else x


def make_corrupted_corpus(root: Path):
    """A tar with every bad class + stereo 44.1 kHz and 48 kHz good samples, a manifest, a folder."""
    good = _demo_members(4)
    m = []
    for key, ext, data, meta in good:
        m += [(f"{key}.{ext}", data), (f"{key}.json", json.dumps(meta).encode())]
    meta = lambda i, **kw: json.dumps({"id": i, "text": " hello there", "speaker": "s9", "language": "en", **kw}).encode()
    m += [("stereo44.wav", _wav(_tone(1.5, 44100, 2), 44100)), ("stereo44.json", meta("stereo44"))]
    m += [("hi48.flac", None), ("hi48.json", meta("hi48"))]
    buf = io.BytesIO(); sf.write(buf, _tone(2.0, 48000), 48000, format="FLAC"); m[-2] = ("hi48.flac", buf.getvalue())
    m += [("junk.mp3", os.urandom(3000)), ("junk.json", meta("junk"))]                       # undecodable
    m += [("notext.wav", _wav(_tone(1, 16000), 16000)), ("notext.json", meta("notext", text="   "))]
    m += [("zerolen.wav", _wav(np.zeros(0), 16000)), ("zerolen.json", meta("zerolen"))]
    nan = _tone(1, 16000).astype(np.float32); nan[100] = np.nan
    m += [("nan.wav", _wav(nan, 16000, "FLOAT")), ("nan.json", meta("nan"))]
    m += [("badjson.wav", _wav(_tone(1, 16000), 16000)), ("badjson.json", b"{not json")]
    m += [("lonely.wav", _wav(_tone(1, 16000), 16000))]                                        # no json
    m += [("orphan.json", meta("orphan"))]                                                     # no audio
    m += [("short.wav", _wav(_tone(0.2, 16000), 16000)), ("short.json", meta("short"))]
    m += [("long.wav", _wav(_tone(31, 16000), 16000)), ("long.json", meta("long"))]
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "mixed.tar").write_bytes(tar_bytes(m))
    # fine-tuner JSONL manifest: 2 good, 1 invalid line, 1 missing file
    (root / "wavs").mkdir()
    sf.write(root / "wavs" / "a.wav", _tone(1.2, 22050), 22050)
    sf.write(root / "wavs" / "b.wav", _tone(1.0, 16000), 16000)
    lines = [json.dumps({"audio": "wavs/a.wav", "text": " manifest one ", "dataset_id": 0}),
             json.dumps({"audio": "wavs/b.wav", "text": "manifest two", "description": "soft voice"}),
             "{broken", json.dumps({"audio": "wavs/missing.wav", "text": "gone"})]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    # plain folder: x.wav + x.txt, one wav without transcript
    (root / "folder").mkdir()
    sf.write(root / "folder" / "x.wav", _tone(1.0, 24000), 24000)
    (root / "folder" / "x.txt").write_text("folder sample\n")
    sf.write(root / "folder" / "y.wav", _tone(1.0, 24000), 24000)
    return [str(root / "bad"), str(root / "train.jsonl"), str(root / "folder")]


def test_corrupted_corpus_keeps_good_counts_bad(tmp_path, caplog):
    inputs = make_corrupted_corpus(tmp_path / "in")
    out = tmp_path / "out"
    caplog.set_level("WARNING")
    report = run_encode(inputs, str(out), EncodeOptions(vae_config="tiny"))
    assert report["skipped"] == {"empty_audio": 1, "empty_text": 1, "invalid_json": 2, "missing_pair": 4,
                                 "non_finite_audio": 1, "too_long": 1, "too_short": 1, "undecodable": 1}
    assert report["kept"] == 4 + 2 + 2 + 1
    assert json.loads((out / "report.json").read_text()) == report
    for bad in ("mixed/junk", "mixed/notext", "mixed/zerolen", "mixed/nan", "mixed/badjson", "mixed/lonely",
                "mixed/orphan", "mixed/short", "mixed/long", "train/00000003", "folder/y"):
        assert any(bad in r.getMessage() for r in caplog.records), bad
    index = {s["key"]: s for u in ("mixed", "train-000000", "folder-000000")
             for s in json.loads((out / f"{u}.index.json").read_text())["samples"]}
    assert index["stereo44"]["duration"] == pytest.approx(1.5, abs=1e-3)    # downmixed, resampled
    assert index["hi48"]["duration"] == pytest.approx(2.0, abs=1e-3)
    assert index["hi48"]["frames"] == 52                                    # 4 * ceil(2 s * 16k / 2560)
    assert index["00000001-a"]["text"] == "manifest one"
    assert index["00000002-b"]["description"] == "soft voice"
    assert index["x"]["text"] == "folder sample"
    for key, _, _, meta in _demo_members(4):
        assert index[key]["text"] == meta["text"].strip() and index[key]["speaker"] == meta["speaker"]
    # every kept latent is a float16 [T, 64] .npy readable without pickle, at its indexed offset
    with tarfile.open(out / "mixed.tar") as tar:
        names = tar.getnames()
        z = load_npy(tar.extractfile("stereo44.latent.npy").read())
    assert z.dtype == np.float16 and z.shape == (index["stereo44"]["frames"], 64) and np.isfinite(z).all()
    assert names.count("stereo44.json") == 1 and len(names) == 2 * 6


def test_webdataset_reads_shards_and_inspect(tmp_path):
    inputs = make_corrupted_corpus(tmp_path / "in")
    out = tmp_path / "out"
    run_encode(inputs[1:], str(out), EncodeOptions(vae_config="tiny"))
    import webdataset as wds
    ds = wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)
    got = [(s["__key__"], json.loads(s["json"])["text"], load_npy(s["latent.npy"]).shape) for s in ds]
    assert [g[1] for g in got] == ["manifest one", "manifest two"]
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "inspect", str(out)], capture_output=True,
                       text=True, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "3 samples" in r.stdout and "length histogram" in r.stdout and "missing_pair" in r.stdout


def _encode_cmd(inputs, out):
    return [sys.executable, "-m", "data_pipeline.cli", "encode", *inputs, "--output", str(out), "--config", "tiny",
            "--batch-seconds", "8"]


def test_killed_encode_resumes_byte_identical(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    members = _demo_members(9)
    for s in range(3):  # 3 input tars -> 3 units
        m = []
        for key, ext, data, meta in members[s * 3:(s + 1) * 3]:
            m += [(f"{key}.{ext}", data), (f"{key}.json", json.dumps(meta).encode())]
        (src / f"part-{s}.tar").write_bytes(tar_bytes(m))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_encode_cmd([str(src)], ref), check=True, env=env, cwd=REPO, capture_output=True)
    proc = subprocess.Popen(_encode_cmd([str(src)], out), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "part-0.report.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "part-0.tar").exists() and not (out / "report.json").exists(), "kill came too late"
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.tar")}
    r = subprocess.run(_encode_cmd([str(src)], out), env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert "1 done" in r.stderr or "2 done" in r.stderr
    for name, mtime in done_before.items():  # finished units were not redone
        assert (out / name).stat().st_mtime_ns == mtime
    files = sorted(p.name for p in ref.iterdir())
    assert files == sorted(p.name for p in out.iterdir())   # no temp leftovers
    for name in files:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name


def test_restart_with_other_settings_refused(tmp_path):
    inputs = make_corrupted_corpus(tmp_path / "in")[2:]
    run_encode(inputs, str(tmp_path / "o"), EncodeOptions(vae_config="tiny"))
    with pytest.raises(SystemExit, match="other settings"):
        run_encode(inputs, str(tmp_path / "o"), EncodeOptions(vae_config="tiny", seed=5))
