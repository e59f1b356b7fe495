"""Per-dataset sample filters (`DatasetConfig.filter`): exact subsets of the demo corpus (expected keys
read from the corpus' own JSON, not from our index), the subset is all the loader draws (also as reference
clips), the start-up errors, the shared token cache, exact resume with filters in a fresh process, and a
changed filter on resume handled as a blend switch."""
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from data_pipeline.config import DataConfig, DatasetConfig, LayoutProbs, SampleFilter
from data_pipeline.encode import EncodeOptions, run_encode
from data_pipeline.latent_dataset import LatentDataset
from data_pipeline.loader import VoxCPMDataLoader
from data_pipeline.packing import row_seed
from data_pipeline.tokenizer import TextTokenizer
from test_data_loader import _restore_in_fresh_process, _same, _take

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "demo_data/tokenizer")
TAR = REPO / "demo_data/emilia/demo-000000.tar"      # 23 clips: 13 with dnsmos >= 3.4, 2 with a description


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo0") / "latents"
    rep = run_encode([str(TAR)], str(out), EncodeOptions(vae_config="tiny"))
    assert rep["kept"] == 23 and rep["skipped_total"] == 0
    return str(out)


@pytest.fixture(scope="module")
def corpus_meta():
    """{key: metadata JSON} of the raw corpus tar (the Emilia-style source, not our index)."""
    meta = {}
    for tar_path in [TAR]:
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    return meta


def _keys(ds: LatentDataset) -> list:
    return [s["key"] for s in ds.samples]


def _index_order(latents) -> list:
    return _keys(LatentDataset(latents))


def _cfg(latents, datasets, **kw):
    base = dict(datasets=datasets, tokenizer_path=TOKENIZER, row_tokens=384, rows_per_microbatch=2,
                window_samples=64, num_workers=0, seed=11)
    base.update(kw)
    return DataConfig(**base)


def test_filters_select_exactly_the_expected_keys(latents, corpus_meta):
    order = _index_order(latents)
    assert sorted(order) == sorted(corpus_meta)
    dur = {s["key"]: s["duration"] for s in LatentDataset(latents).samples}
    cases = [
        (SampleFilter(min_dnsmos=3.4), lambda m, k: m["dnsmos"] >= 3.4),
        ({"require_description": True}, lambda m, k: bool(m.get("description"))),
        ({"languages": ["ZH", "de"]}, lambda m, k: m["language"] in ("zh", "de")),
        ({"languages": "it"}, lambda m, k: m["language"] == "it"),
        ({"min_duration": 2.5, "max_duration": 3.5}, lambda m, k: 2.5 <= dur[k] <= 3.5),
        ({"min_dnsmos": 3.2, "languages": ["en"], "max_duration": 4.0},
         lambda m, k: m["dnsmos"] >= 3.2 and m["language"] == "en" and dur[k] <= 4.0),
        ({"min_dnsmos": None, "require_description": False, "languages": None}, lambda m, k: True),
    ]
    tok = TextTokenizer(TOKENIZER)
    for flt, pred in cases:
        want = [k for k in order if pred(corpus_meta[k], k)]
        ds = LatentDataset(latents, tok, 4, filter=flt, name="x")
        assert _keys(ds) == want, flt                               # exact subset, in index order
        assert len(ds) == len(ds.speaker) == len(ds.patches) == len(ds.shard_id) == len(ds.text_offsets) - 1
        for i in range(len(ds)):                                     # token ids / latents of the right sample
            assert ds.text_ids(i) == tok(ds.text(i))
            assert ds.latent(i).shape == (ds.samples[i]["frames"], 64)
        for grp in ds.by_speaker:                                    # reference clips: inside the subset
            assert all(0 <= j < len(ds) for j in grp)
    # the demo corpus splits non-trivially
    n_hq = sum(m["dnsmos"] >= 3.4 for m in corpus_meta.values())
    n_design = sum(bool(m.get("description")) for m in corpus_meta.values())
    assert 5 < n_hq < len(corpus_meta) - 5 and n_design == 2


def test_loader_draws_only_the_subset(latents, corpus_meta):
    """A voice-design dataset (descriptions only) next to an hq one: every packed segment is one of the
    subset's samples, with its "(description)text" tokens, and references come from the subset too."""
    tok = TextTokenizer(TOKENIZER)
    design = {tuple(tok(f"({m['description']}){m['text'].strip()}")) for m in corpus_meta.values()
              if m.get("description")}
    cfg = _cfg(latents, [DatasetConfig(name="design", path=latents, layouts=LayoutProbs(1, 0, 0, 0),
                                       filter=SampleFilter(require_description=True))])
    loader = VoxCPMDataLoader(cfg)
    segs = 0
    for b in _take(loader, 4):
        for r in range(b["segment_ids"].shape[0]):
            seg = b["segment_ids"][r]
            for s in seg.unique().tolist():
                if s:
                    toks = b["text_tokens"][r][seg == s].tolist()
                    assert tuple(toks[:toks.index(101)]) in design
                    segs += 1
    assert segs >= 8
    hq = VoxCPMDataLoader(_cfg(latents, [DatasetConfig(name="hq", path=latents, filter={"min_dnsmos": 3.4})]))
    _, plans = hq.planner.next_window()
    ds = hq.datasets[0]
    used = {ds.samples[i]["key"] for p in plans for row in p["rows"] for s in row for i in (s.idx, s.ref, s.prompt)
            if i >= 0}
    assert any(s.ref >= 0 for p in plans for row in p["rows"] for s in row)
    assert used <= {k for k, m in corpus_meta.items() if m["dnsmos"] >= 3.4}


def test_empty_or_invalid_filter_is_a_startup_error(latents):
    def build(flt):
        VoxCPMDataLoader(_cfg(latents, [DatasetConfig(name="tts", path=latents),
                                        DatasetConfig(name="hq_subset", path=latents, filter=flt)]))

    with pytest.raises(ValueError, match=r"dataset 'hq_subset' .*'min_dnsmos': 9\.0.*keeps 0 of 23 samples"):
        build({"min_dnsmos": 9.0})
    with pytest.raises(ValueError, match=r"dataset 'hq_subset' .*languages.*keeps 0 of 23.*languages rejects 23"):
        build({"languages": ["ja"], "min_dnsmos": 3.0})
    with pytest.raises(ValueError, match=r"dataset 'hq_subset': unknown filter key\(s\) \['min_dnsmo'\]"):
        build({"min_dnsmo": 3.4})
    with pytest.raises(ValueError, match=r"dataset 'hq_subset': filter.min_duration 5.0 > max_duration 2.0"):
        build({"min_duration": 5.0, "max_duration": 2.0})
    with pytest.raises(ValueError, match=r"filter.languages is empty"):
        build({"languages": []})
    with pytest.raises(ValueError, match=r"filter.require_description must be true/false"):
        build({"require_description": "yes"})


def test_latents_without_dnsmos_name_the_cause(latents, tmp_path):
    """Latents encoded from metadata without dnsmos (e.g. a JSONL manifest): the error says so."""
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    for idx in folder.glob("*.index.json"):
        d = json.loads(idx.read_text())
        for s in d["samples"]:
            s["dnsmos"] = None
        idx.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"dataset 'hq'.*no sample has a dnsmos value"):
        LatentDataset(folder, filter={"min_dnsmos": 3.4}, name="hq")


def test_token_cache_is_over_the_whole_folder(latents, tmp_path):
    """A filtered dataset built first writes the cache for every sample; an unfiltered (or differently
    filtered) dataset on the same folder then reads the right ids from it."""
    folder = tmp_path / "lat"
    shutil.copytree(latents, folder)
    for f in folder.glob("tokens-*.npz"):
        f.unlink()
    tok = TextTokenizer(TOKENIZER)
    first = LatentDataset(folder, tok, 4, filter={"languages": ["en"]})
    assert len(list(folder.glob("tokens-*.npz"))) == 1
    for flt in (None, {"languages": ["fr"]}, {"languages": ["en"]}):
        ds = LatentDataset(folder, tok, 4, filter=flt)
        assert len(ds) > 0 and all(ds.text_ids(i) == tok(ds.text(i)) for i in range(len(ds)))
    assert _keys(first) == _keys(LatentDataset(folder, tok, 4, filter={"languages": ["en"]}))


def _blend(latents, hq_filter, design_filter=None):
    return _cfg(latents, [
        DatasetConfig(name="tts", path=latents, weight=0.5),
        DatasetConfig(name="design", path=latents, weight=0.2, layouts=LayoutProbs(1, 0, 0, 0),
                      filter=design_filter or SampleFilter(require_description=True)),
        DatasetConfig(name="hq", path=latents, weight=0.3, filter=hq_filter)])


def test_resume_with_filters_is_exact_in_a_fresh_process(latents, tmp_path):
    cfg = _blend(latents, SampleFilter(min_dnsmos=3.4, languages=["zh", "en", "de", "fr", "es", "it"]))
    full = _take(VoxCPMDataLoader(cfg), 12)
    loader = VoxCPMDataLoader(cfg)
    _take(loader, 7)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["filters"] == [{}, {"require_description": True},
                                {"languages": ["de", "en", "es", "fr", "it", "zh"], "min_dnsmos": 3.4}]
    assert state["dataset_sizes"] == [23, 2, 13]
    got = _restore_in_fresh_process(tmp_path, [(cfg, state, 0, 1, 5)])
    _same(got[0], full[7:])
    # the same filter written differently (language order / case, a dict) is the same filter
    same = _blend(latents, {"min_dnsmos": 3.4, "languages": ["IT", "es", "fr", "de", "en", "zh"]})
    again = VoxCPMDataLoader(same)
    again.load_state_dict(state)
    _same(_take(again, 5), full[7:])
    assert again.state_dict()["planner"]["stage"] == 0


def test_changed_filter_on_resume_is_a_blend_switch(latents):
    cfg = _blend(latents, {"min_dnsmos": 3.4})
    loader = VoxCPMDataLoader(cfg)
    _take(loader, 7)
    state = json.loads(json.dumps(loader.state_dict()))
    window_cursors = state["planner"]["cursors"]
    assert all(c > 0 for c in window_cursors)

    new = _blend(latents, {"min_dnsmos": 3.5})                  # the hq subset changed
    a, b = VoxCPMDataLoader(new), VoxCPMDataLoader(new)
    a.load_state_dict(state)
    b.load_state_dict(state)
    snap = a._start_snapshot
    assert snap["stage"] == state["planner"]["stage"] + 1 and snap["mbs"] == state["next_global_microbatch"]
    # unchanged datasets continue from the window's cursors; the re-filtered one is a new sample set
    assert snap["cursors"] == window_cursors[:2] + [0]
    first = _take(a, 3)
    _same(first, _take(b, 3))                                   # deterministic
    assert first[0]["row_seeds"][0] == row_seed(11, state["next_row"])
    st = a.state_dict()
    assert st["filters"][2] == {"min_dnsmos": 3.5} and st["planner"]["stage"] == 1
    assert st["dataset_sizes"][2] < state["dataset_sizes"][2]
    # row indices (flow-matching seeds) continue across the switch
    ref = VoxCPMDataLoader(cfg)
    ref.load_state_dict(state)
    assert torch.equal(_take(ref, 1)[0]["row_seeds"], first[0]["row_seeds"])

    # a checkpoint written before filters existed = no filters: exact resume when the config has none,
    # a blend switch when it adds one
    plain = _cfg(latents, [DatasetConfig(name="tts", path=latents), DatasetConfig(name="hq", path=latents)])
    old_loader = VoxCPMDataLoader(plain)
    full = _take(VoxCPMDataLoader(plain), 6)
    _take(old_loader, 4)
    old_state = old_loader.state_dict()
    del old_state["filters"]
    resumed = VoxCPMDataLoader(plain)
    resumed.load_state_dict(old_state)
    _same(_take(resumed, 2), full[4:])
    filtered = VoxCPMDataLoader(_cfg(latents, [DatasetConfig(name="tts", path=latents),
                                               DatasetConfig(name="hq", path=latents, filter={"min_dnsmos": 3.4})]))
    filtered.load_state_dict(old_state)
    assert filtered._start_snapshot["stage"] == 1
    assert filtered._start_snapshot["cursors"] == [old_state["planner"]["cursors"][0], 0]
