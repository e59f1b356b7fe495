"""The columnar sample index (`index.npz` + `tokens-<fingerprint>.npz`): columns equal the sidecars they are
built from, token ids equal the tokenizer's, one mapping per folder shared by its datasets, old / stale
folders rebuilt (small) or refused with the command that builds them (large), tokenizer mismatches, the
file format, and the vectorized planner against a plain per-sample implementation of its rules."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import index as index_mod
from data_pipeline.config import DataConfig, DatasetConfig, LayoutProbs
from data_pipeline.encode import EncodeOptions, run_encode
from data_pipeline.index import INDEX_FILE, IndexNotReady
from data_pipeline.latent_dataset import LatentDataset
from data_pipeline.mapped_npz import FileBytes, NpzWriter, map_npz
from data_pipeline.packing import LAYOUTS, OWN_REF, BatchPlanner, Sample
from data_pipeline.sequences import num_patches, sequence_length, text_with_description
from data_pipeline.shards import json_bytes
from data_pipeline.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "demo_data/tokenizer")
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "latents"
    run_encode([str(REPO / "demo_data/emilia/demo-000000.tar")], str(out), EncodeOptions(vae_config="tiny"))
    return out


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(TOKENIZER)


def _sidecars(folder):
    meta = json.loads((folder / "meta.json").read_text())
    return [(u, e) for u, unit in enumerate(meta["units"])
            for e in json.loads((folder / f"{unit}.index.json").read_text())["samples"]]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


def test_columns_equal_the_sidecars_and_tokens_the_tokenizer(latents, tok):
    assert (latents / INDEX_FILE).is_file()                    # written by encode
    ds = LatentDataset(latents, tok, 4)
    ix = ds.index
    side = _sidecars(latents)
    assert ix.n == len(ds) == len(side) == 23
    speakers = sorted({e["speaker"] for _, e in side if e["speaker"]})
    assert [ix.speaker_names[s] for s in range(ix.num_speakers)] == speakers
    for g, (u, e) in enumerate(side):
        assert ix.key[g] == e["key"] and ix.text[g] == e["text"] and ix.shard[g] == u
        assert ix.frames[g] == e["frames"] and ds.patches[g] == num_patches(e["frames"], 4)
        assert [ix.latent_offset[g], ix.latent_size[g]] == e["latent"] and [ix.json_offset[g], ix.json_size[g]] == e["json"]
        assert ix.duration[g] == e["duration"] and ix.dnsmos[g] == e["dnsmos"]
        assert ix.languages[ix.language[g]] == e["language"]
        assert ix.speaker[g] == speakers.index(e["speaker"])
        assert bool(ix.has_description[g]) == bool(e.get("description"))
        assert ds.text_ids(g) == tok(text_with_description(e["text"], e.get("description")))
        assert ds.samples[g] == e                                # the sidecar entry, rebuilt from the shard
    for s, grp in enumerate(ds.by_speaker):
        assert grp.tolist() == [g for g, (_, e) in enumerate(side) if e["speaker"] == speakers[s]]
    # real .npz files: numpy's own reader sees the same arrays; the mapped ones are read-only views
    with np.load(latents / INDEX_FILE) as z:
        mapped = map_npz(latents / INDEX_FILE)
        assert sorted(z.files) == sorted(mapped)
        for k in z.files:
            np.testing.assert_array_equal(z[k], mapped[k])
    assert not ix.frames.flags.writeable and ix.frames.base is not None
    assert len(list(latents.glob("tokens-*.npz"))) == 1
    # the string bytes are read on demand (pread), not mapped: the same strings as numpy's arrays
    assert isinstance(ix.text.data, FileBytes) and isinstance(ix.key.data, FileBytes)
    with np.load(latents / INDEX_FILE) as z:
        texts = [bytes(z["text_bytes"][a:b]).decode() for a, b in zip(z["text_offsets"][:-1], z["text_offsets"][1:])]
    assert [ix.text[g] for g in range(ix.n)] == texts == ix.text.range(0, ix.n) == ix.text.get_many(np.arange(ix.n))
    assert ix.text.range(5, 9) == texts[5:9] and ix.text.range(3, 3) == []


def test_datasets_on_a_folder_share_one_mapping(latents, tok):
    a = LatentDataset(latents, tok, 4)
    b = LatentDataset(latents, tok, 4, filter={"languages": ["en"]})
    assert a.index is b.index and a.tokens is b.tokens
    assert np.shares_memory(a.speaker, a.index.speaker)          # unfiltered: views, no copy
    en = [g for g in range(a.index.n) if a.index.languages[a.index.language[g]] == "en"]
    assert b.source_index.tolist() == en and b.speaker.tolist() == a.index.speaker[en].tolist()
    for i in range(len(b)):
        assert b.text_ids(i) == a.text_ids(en[i]) and b.key(i) == a.key(en[i])
        np.testing.assert_array_equal(b.latent(i), a.latent(en[i]))
    # pickled (a spawned loader worker) as its arguments, not its arrays; the receiver maps the files
    import pickle
    blob = pickle.dumps(b)
    assert len(blob) < 1000
    c = pickle.loads(blob)
    assert c.source_index.tolist() == en and c.text_ids(1) == b.text_ids(1) and c.index is a.index


def _stream(folder, n=3):
    from data_pipeline.loader import VoxCPMDataLoader
    cfg = DataConfig(datasets=[DatasetConfig(name="d", path=str(folder))], tokenizer_path=TOKENIZER, row_tokens=384,
                     window_samples=64, num_workers=0, seed=5)
    loader = VoxCPMDataLoader(cfg)
    return [next(loader) for _ in range(n)]


def test_old_folder_builds_its_index_or_names_the_command(latents, tmp_path, monkeypatch):
    old = _copy(latents, tmp_path / "old")
    for f in list(old.glob("*.npz")):
        f.unlink()                                               # as encoded before the index existed
    monkeypatch.setattr(index_mod, "AUTO_BUILD_MAX_SAMPLES", 10)
    with pytest.raises(IndexNotReady, match=rf"no {INDEX_FILE} .*`voxcpm-data index {old.resolve()} --tokenizer"):
        LatentDataset(old)
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "index", str(old), "--tokenizer", TOKENIZER],
                       env=ENV, cwd=REPO, capture_output=True, text=True, check=True)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 23 and summary["rebuilt"] and summary["tokens_rebuilt"]
    assert (old / INDEX_FILE).read_bytes() == (latents / INDEX_FILE).read_bytes()   # deterministic build
    a, b = _stream(old), _stream(latents)
    for x, y in zip(a, b):
        for k in x:
            assert (x[k] == y[k]).all(), k
    monkeypatch.setattr(index_mod, "AUTO_BUILD_MAX_SAMPLES", 200_000)   # small folders: built at start-up
    small = _copy(latents, tmp_path / "small")
    (small / INDEX_FILE).unlink()
    assert LatentDataset(small).index.n == 23 and (small / INDEX_FILE).is_file()


def test_ranks_starting_together_build_a_small_folder_once(latents, tmp_path):
    """While one process holds the folder's build lock (building), another one starting on the folder
    waits for it and then maps what it wrote instead of building a second copy."""
    folder = _copy(latents, tmp_path / "f")
    for f in folder.glob("*.npz"):
        f.unlink()
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from data_pipeline.latent_dataset import LatentDataset\n"
            "from data_pipeline.tokenizer import TextTokenizer\n"
            "tok = TextTokenizer(sys.argv[2]); print('opening', flush=True)\n"
            "ds = LatentDataset(sys.argv[1], tok, 4); print(ds.index.digest, ds.text_ids(3), flush=True)\n")
    with index_mod.build_lock(folder):
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder), TOKENIZER], env=ENV, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "opening"
        import time
        time.sleep(1.0)                      # it finds no index and blocks on the lock
        assert proc.poll() is None and not (folder / INDEX_FILE).exists()
        index_mod.build_folder_index(folder, TOKENIZER, workers=1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    ds = LatentDataset(folder, TextTokenizer(TOKENIZER), 4)
    assert out.split()[0] == ds.index.digest
    assert "building the sample index" not in err and "tokenizing" not in err, err


def test_stale_index_is_detected(latents, tmp_path, monkeypatch):
    folder = _copy(latents, tmp_path / "f")
    unit = json.loads((folder / "meta.json").read_text())["units"][0]
    side = folder / f"{unit}.index.json"
    built = (folder / INDEX_FILE).stat().st_mtime_ns
    # unchanged content with a newer mtime (a copy that did not keep times): verified by hash, kept
    os.utime(side, ns=(built + 10**9, built + 10**9))
    ds = LatentDataset(folder)
    assert (folder / INDEX_FILE).stat().st_mtime_ns == built and ds.index.n == 23
    # same size, other content, newer mtime: the hash says it changed
    d = json.loads(side.read_text())
    k = next(i for i, e in enumerate(d["samples"]) if e["text"][0].isascii() and e["text"][0].isalpha())
    t = d["samples"][k]["text"]
    d["samples"][k]["text"] = ("Q" if t[0] != "Q" else "R") + t[1:]
    side.write_bytes(json_bytes(d))
    assert side.stat().st_size == latents.joinpath(side.name).stat().st_size
    monkeypatch.setattr(index_mod, "AUTO_BUILD_MAX_SAMPLES", 10)
    with pytest.raises(IndexNotReady, match=r"1 sidecar\(s\) changed since it was built .*voxcpm-data index"):
        LatentDataset(folder)
    monkeypatch.setattr(index_mod, "AUTO_BUILD_MAX_SAMPLES", 200_000)
    tok = TextTokenizer(TOKENIZER)
    ds = LatentDataset(folder, tok, 4)                           # rebuilt, and its tokens with it
    new = d["samples"][k]
    assert ds.plain_text(k) == new["text"] and ds.text_ids(k) == tok(text_with_description(new["text"], new.get("description")))


def test_tokenizer_mismatch(latents, tmp_path, monkeypatch, tok):
    folder = _copy(latents, tmp_path / "f")
    LatentDataset(folder, tok, 4)
    other = _copy(TOKENIZER, tmp_path / "tok2")
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 12345                              # another tokenizer folder (same vocab)
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok2 = TextTokenizer(other)
    assert tok2.fingerprint() != tok.fingerprint()
    monkeypatch.setattr(index_mod, "AUTO_BUILD_MAX_SAMPLES", 10)
    with pytest.raises(IndexNotReady, match=rf"tokens-{tok.fingerprint()}\.npz.*voxcpm-data index .* --tokenizer {other}"):
        LatentDataset(folder, tok2, 4)
    LatentDataset(folder, tok, 4)                                 # the indexed tokenizer still loads
    monkeypatch.setattr(index_mod, "AUTO_BUILD_MAX_SAMPLES", 200_000)
    ds = LatentDataset(folder, tok2, 4)
    assert len(list(folder.glob("tokens-*.npz"))) == 2 and ds.text_ids(3) == tok2(ds.text(3))


def test_tokenizer_batch_equals_call(tok, latents):
    ds = LatentDataset(latents)
    texts = [ds.text(i) for i in range(len(ds))] + [ds.plain_text(i) + ds.plain_text(i + 1) for i in range(10)]
    texts += ["今天天气很好，我们去公园散步吧。", "(温柔的年轻女声)我喜欢学习新的语言和文化。", " leading space", "",
              "<unk> </s> <|audio_start|> x", "Hola, ¿cómo estás? 北京是中国的首都"]
    assert tok.batch(texts) == [tok(t) for t in texts]
    assert tok._id_rewrites(), "the demo tokenizer has multi-character Chinese tokens to split"


def test_npz_files_are_deterministic_aligned_and_never_unpickled(tmp_path):
    arrays = {"a": np.arange(7, dtype=np.int64), "b": np.array([1.5, np.nan]), "e": np.zeros(0, np.int32),
              "s": np.frombuffer("héllo".encode(), np.uint8)}
    for name in ("x.npz", "y.npz"):
        with NpzWriter(tmp_path / name) as w:
            for k, v in arrays.items():
                w.add(k, v)
            w.add_chunks("c", np.int32, (5,), [np.arange(2), np.arange(3)])
    assert (tmp_path / "x.npz").read_bytes() == (tmp_path / "y.npz").read_bytes()
    m = map_npz(tmp_path / "x.npz")
    for k, v in arrays.items():
        np.testing.assert_array_equal(m[k], v)
        assert m[k].ctypes.data % 64 == 0 or m[k].size == 0
    assert m["c"].tolist() == [0, 1, 0, 1, 2]
    with np.load(tmp_path / "x.npz") as z:
        assert z["c"].tolist() == [0, 1, 0, 1, 2]
    # a byte member read on demand: slices by pread, in this process, a pickled copy and a forked child
    fb = map_npz(tmp_path / "x.npz", read_on_demand=["s"])["s"]
    raw = "héllo".encode()
    assert isinstance(fb, FileBytes) and len(fb) == len(raw)
    assert fb[0:len(raw)] == raw and fb[1:3] == raw[1:3] and fb[4:2] == b"" and fb[-2:] == raw[-2:]
    import pickle
    assert pickle.loads(pickle.dumps(fb))[2:5] == raw[2:5]
    import multiprocessing as mp
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(fb.__getitem__, (slice(0, 3),)) == raw[:3]
    with pytest.raises(ValueError, match="not a byte string"):
        map_npz(tmp_path / "x.npz", read_on_demand=["a"])
    np.savez_compressed(tmp_path / "z.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="compressed"):
        map_npz(tmp_path / "z.npz")
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    import zipfile
    with zipfile.ZipFile(tmp_path / "o.npz", "w") as zf:
        zf.write(tmp_path / "obj.npy", "o.npy")
    with pytest.raises(ValueError, match="Python objects"):
        map_npz(tmp_path / "o.npz")


# --------------------------------------------------------------------------------------------------
# the planner's vectorized draws and packing against plain per-sample code


def _ffd_one_at_a_time(samples, cap):
    order = sorted(range(len(samples)), key=lambda i: (-samples[i].length, i))
    free, rows = [], []
    for i in order:
        j = next((j for j, f in enumerate(free) if f >= samples[i].length), None)
        if j is None:
            rows.append([samples[i]])
            free.append(cap - samples[i].length)
        else:
            rows[j].append(samples[i])
            free[j] -= samples[i].length
    return rows


def test_packing_equals_first_fit_decreasing_one_item_at_a_time():
    rng = np.random.default_rng(0)
    cfg = DataConfig(row_tokens=512)
    planner = BatchPlanner.__new__(BatchPlanner)
    planner.cfg = cfg
    for trial in range(20):
        lengths = rng.choice(rng.integers(5, 512, 12), size=int(rng.integers(1, 300)))   # many equal lengths
        samples = [Sample(0, i, "tts", -1, -1, int(L), []) for i, L in enumerate(lengths)]
        got = [[s.idx for s in r] for r in planner._pack_rows(samples)]
        want = [[s.idx for s in r] for r in _ffd_one_at_a_time(samples, 512)]
        assert got == want, trial


def _synthetic_folder(root: Path, n=400, seed=0) -> Path:
    """A latent folder's metadata only (meta.json + sidecars; planning reads no shard): speakers with 1-9
    utterances (some none), descriptions, own reference clips on a third of the samples."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    words = "the a quick brown fox jumps over lazy dog hello world voice test".split()
    units = ["u-000000", "u-000001"]
    for u, name in enumerate(units):
        samples = []
        for i in range(n // 2):
            e = {"key": f"k{u}_{i}", "text": " ".join(rng.choice(words, int(rng.integers(1, 12)))),
                 "speaker": f"s{int(rng.integers(0, n // 5))}" if rng.random() < 0.8 else "", "language": "en",
                 "duration": 1.0, "frames": int(rng.integers(8, 1100)), "latent": [512, 100], "json": [1024, 10]}
            if rng.random() < 0.1:
                e["description"] = "a soft voice"
            if rng.random() < 0.33:
                e.update(ref_frames=int(rng.integers(4, 400)), ref_latent=[2048, 100])
            samples.append(e)
        (root / f"{name}.index.json").write_bytes(json_bytes({"shard": f"{name}.tar", "samples": samples}))
    (root / "meta.json").write_bytes(json_bytes({"frame_rate_hz": 25.0, "units": units, "vae": {"weights": "x"}}))
    return root


def _reference_draw(ds, idx, u, cdf, cfg, tok):
    """The planner's rules for one draw, written out per sample (DESIGN §5 layouts, docs/data.md)."""
    layout = LAYOUTS[min(int(np.searchsorted(cdf, u[0], side="right")), 3)]
    if ds.has_description[idx]:
        layout = {"continuation": "tts", "clone_continuation": "clone"}.get(layout, layout)
    spk = int(ds.speaker[idx])
    cand = [int(j) for j in ds.by_speaker[spk] if j != idx and ds.patches[j] <= cfg.max_ref_patches] if spk >= 0 else []
    own = ds.ref_patches is not None and ds.ref_patches[idx] > 0
    if not cand:
        layout = {"continuation": "tts", "clone_continuation": "clone"}.get(layout, layout) if own else "tts"
    ref = prompt = -1
    if layout in ("clone", "clone_continuation"):
        ref = OWN_REF if own else cand[int(u[1] * len(cand))]
    if layout in ("continuation", "clone_continuation"):
        pool = [c for c in cand if c != ref] if len(cand) > 1 else cand
        prompt = pool[int(u[2] * len(pool))]
    r = int(ds.ref_patches[idx]) if ref == OWN_REF else int(ds.patches[ref]) if ref >= 0 else 0
    q = int(ds.patches[prompt]) if prompt >= 0 else 0
    text = tok(ds.plain_text(prompt) + ds.plain_text(idx)) if prompt >= 0 else None     # None: stored ids
    length = sequence_length(layout, len(text) if text is not None else ds.n_text(idx), int(ds.patches[idx]), r, q)
    if length > cfg.row_tokens and layout != "tts":
        layout, ref, prompt, text = "tts", -1, -1, None
        length = sequence_length("tts", ds.n_text(idx), int(ds.patches[idx]))
    if length > cfg.row_tokens:
        return None
    return Sample(0, int(idx), layout, ref, prompt, length, text)


@pytest.mark.parametrize("layouts,max_ref", [(LayoutProbs(), 75), (LayoutProbs(0.1, 0.3, 0.3, 0.3), 40),
                                             (LayoutProbs(0, 0, 0, 1), 200)])
def test_planner_draws_equal_the_per_sample_rules(tmp_path, tok, layouts, max_ref):
    folder = _synthetic_folder(tmp_path / "syn")
    cfg = DataConfig(datasets=[], tokenizer_path=TOKENIZER, row_tokens=256, window_samples=300, seed=4,
                     max_ref_patches=max_ref)
    ds = LatentDataset(folder, tok, 4, filter={"max_duration": 5.0})
    assert ds.ref_patches is not None and (ds.ref_patches > 0).sum() > 50 and (ds.speaker < 0).sum() > 20
    probs = vars(layouts)
    planner = BatchPlanner([ds], [1.0], [probs], cfg, tok)
    cdf = np.cumsum(np.asarray([probs[k] for k in LAYOUTS]) / sum(probs.values()))
    cursor, counts, own = 0, {k: 0 for k in LAYOUTS}, 0
    for w in range(3):                                          # crosses epochs (300 draws of 400)
        rng = np.random.default_rng([w])
        got = planner._draw_window(np.random.default_rng([w]))
        rng.choice(1, size=cfg.window_samples, p=[1.0])
        u = rng.random((cfg.window_samples, 3))
        want = []
        for k in range(cfg.window_samples):
            perm = np.random.default_rng([cfg.seed, 0xDA7A, 0, cursor // len(ds)]).permutation(len(ds))
            s = _reference_draw(ds, int(perm[cursor % len(ds)]), u[k], cdf, cfg, tok)
            cursor += 1
            if s is not None:
                want.append(s)
        assert got == want, w
        for s in got:
            counts[s.layout] += 1
            own += s.ref == OWN_REF
        assert planner.state["cursors"] == [cursor]
    # the synthetic folder exercises the rules: own references, fallbacks to tts, drops
    assert own > 20 and counts["tts"] > 0 and planner.state["dropped"] > 0
    assert counts["clone_continuation"] > 0 and (counts["continuation"] > 0 or probs["continuation"] == 0)


def test_tokenizer_fingerprint_is_the_tokenizer_files_only(tmp_path):
    """A model folder, its import's hf_assets and a run's hold the same tokenizer next to other files
    (config.json rewritten by the import, weights): same fingerprint, so stored token ids stay valid; a
    changed tokenizer file changes it."""
    base = TextTokenizer(TOKENIZER).fingerprint()
    folder = tmp_path / "model"
    shutil.copytree(TOKENIZER, folder)
    (folder / "config.json").write_text(json.dumps({"architecture": "voxcpm2"}, indent=2))
    (folder / "lora_info.json").write_text("{}")
    assert TextTokenizer(folder).fingerprint() == base
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, model_max_length=123)))
    assert TextTokenizer(folder).fingerprint() != base
