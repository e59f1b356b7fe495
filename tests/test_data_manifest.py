"""The official fine-tuner's JSONL manifest, fully honoured: `ref_audio` encoded and used as that sample's
reference (clone sequences from the loader equal the reference `AudioFeatureProcessingPacker` given the same
audio, reference and text), optional speaker / language / dnsmos columns, dropped fields counted by name,
bad reference clips skipped and counted, and the loud warning of an encode without `--vae`."""
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_pipeline.audio import decode_audio
from data_pipeline.config import DataConfig, DatasetConfig, LayoutProbs
from data_pipeline.encode import EncodeOptions, LatentEncoder, run_encode
from data_pipeline.latent_dataset import LatentDataset
from data_pipeline.loader import MicroBatchAssembler, VoxCPMDataLoader
from data_pipeline.packing import OWN_REF
from data_pipeline.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "demo_data/tokenizer")


def _demo_clips(n):
    """(text, 16 kHz audio) of the first n clips of the demo corpus."""
    out = []
    with tarfile.open(REPO / "demo_data/emilia/demo-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in sorted(members):
        if name.endswith(".json"):
            key = name[:-5]
            ext = next(e for e in ("ogg", "mp3", "flac") if f"{key}.{e}" in members)
            out.append((json.loads(members[name])["text"].strip(), decode_audio(members[f"{key}.{ext}"], key)))
        if len(out) == n:
            return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Manifest rows (by their `<line>-<stem>` key): own reference / speaker / optional columns / unknown
    fields; plus one row whose ref_audio file is missing and one whose ref_audio is not audio."""
    root = tmp_path_factory.mktemp("manifest")
    clips = _demo_clips(8)
    (root / "wavs").mkdir()
    for i, (_, audio) in enumerate(clips):
        sf.write(root / "wavs" / f"c{i}.wav", audio, 16000)
    (root / "wavs" / "junk.wav").write_bytes(os.urandom(2000))
    t = [c[0] for c in clips]
    rows = [
        {"audio": "wavs/c0.wav", "text": t[0], "ref_audio": "wavs/c4.wav"},                        # no speaker
        {"audio": "wavs/c1.wav", "text": t[1], "ref_audio": "wavs/c5.wav", "ref_duration": 9.9,
         "speaker": "spk", "language": "en", "dnsmos": 3.6, "emotion": "happy", "dataset_id": 0},
        {"audio": "wavs/c2.wav", "text": t[2], "speaker": "spk", "language": "en", "dnsmos": 3.1},  # no ref
        {"audio": "wavs/c3.wav", "text": t[3], "emotion": "sad", "duration": 2.0},                 # plain tts
        {"audio": "wavs/c6.wav", "text": t[6], "ref_audio": "wavs/missing.wav"},
        {"audio": "wavs/c7.wav", "text": t[7], "ref_audio": "wavs/junk.wav"},
    ]
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"path": path, "root": root, "rows": rows, "clips": clips}


@pytest.fixture(scope="module")
def encoded(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "latents"
    logger = logging.getLogger("voxcpm_data.encode")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        report = run_encode([str(manifest["path"])], str(out), EncodeOptions(vae_config="tiny"))
    finally:
        logger.removeHandler(handler)
    return {"dir": out, "report": report, "log": [r.getMessage() for r in records]}


def _key_of_row(ds):
    """{manifest row number (0-based): dataset index}."""
    return {int(ds.key(i).split("-")[0]) - 1: i for i in range(len(ds))}


def test_encode_counts_dropped_fields_bad_references_and_warns_random_vae(encoded):
    rep, log = encoded["report"], encoded["log"]
    assert rep["kept"] == 4
    assert rep["skipped"] == {"missing_pair": 1, "undecodable": 1}
    assert rep["dropped_fields"] == {"emotion": 2}                 # ref_duration / duration: measured instead
    assert any("dropped" in m and "emotion (2 samples)" in m for m in log)
    assert any("ref_audio" in m and "junk.wav" in m for m in log)
    assert any("missing.wav" in m for m in log)
    assert any("RANDOMLY INITIALISED" in m for m in log)
    meta = json.loads((encoded["dir"] / "meta.json").read_text())
    assert meta["vae"]["weights"] == "random_init"


def test_optional_columns_and_references_in_the_index(encoded, manifest):
    ds = LatentDataset(encoded["dir"])
    row = _key_of_row(ds)
    assert sorted(row) == [0, 1, 2, 3]
    ix = ds.index
    assert [ix.speaker_names[s] for s in range(ix.num_speakers)] == ["spk"]
    assert ds.speaker[row[0]] == -1 and ds.speaker[row[1]] == ds.speaker[row[2]] >= 0
    assert ix.languages[ix.language[row[1]]] == "en" and ix.languages[ix.language[row[0]]] == ""
    assert ix.dnsmos[row[1]] == 3.6 and np.isnan(ix.dnsmos[row[0]])
    hq = LatentDataset(encoded["dir"], filter={"min_dnsmos": 3.5})
    assert [hq.key(i) for i in range(len(hq))] == [ds.key(row[1])]
    enc = LatentEncoder(EncodeOptions(vae_config="tiny"))
    for r, ref_clip in ((0, 4), (1, 5)):
        want = enc([manifest["clips"][ref_clip][1]])[0]
        got = ds.ref_latent(row[r])
        assert got.shape == want.shape and ds.samples[row[r]]["ref_frames"] == want.shape[0]
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
        assert ds.samples[row[r]]["ref_duration"] == pytest.approx(len(manifest["clips"][ref_clip][1]) / 16000, abs=1e-3)
    assert ds.ref_patches[row[2]] == 0 and ds.ref_patches[row[3]] == 0
    with pytest.raises(ValueError, match="no reference clip of its own"):
        ds.ref_latent(row[2])


def _segments(loader, plans_loader, n_mb):
    """[(Sample, {key: segment array})] of the first n_mb micro-batches the loader serves (the plans come
    from a second, identical loader's planner: the stream is deterministic)."""
    plans = []
    while len(plans) < n_mb:
        plans += plans_loader.planner.next_window()[1]
    out = []
    for plan in plans[:n_mb]:
        b = next(loader)
        for r, row in enumerate(plan["rows"]):
            seg = b["segment_ids"][r]
            for k, s in enumerate(row, 1):
                m = seg == k
                out.append((s, {key: b[key][r][m] for key in ("text_tokens", "text_mask", "audio_mask",
                                                                "loss_mask", "labels", "audio_feats")}))
    return out


def _cfg(folder, layouts):
    return DataConfig(datasets=[DatasetConfig(name="ft", path=str(folder), layouts=layouts)], tokenizer_path=TOKENIZER,
                      row_tokens=256, rows_per_microbatch=1, window_samples=16, num_workers=0, seed=3)


def test_manifest_ref_audio_gives_clone_sequences_equal_to_the_reference_packer(encoded, manifest):
    from test_data_sequences import packers

    cfg = _cfg(encoded["dir"], LayoutProbs(0, 1, 0, 0))
    segs = _segments(VoxCPMDataLoader(cfg), VoxCPMDataLoader(cfg), 6)
    ds = LatentDataset(encoded["dir"], TextTokenizer(TOKENIZER))
    row = {i: r for r, i in _key_of_row(ds).items()}
    tok = TextTokenizer(TOKENIZER)
    vae = LatentEncoder(EncodeOptions(vae_config="tiny")).vae        # the VAE encode used (same seed)
    packer = packers.AudioFeatureProcessingPacker(dataset_cnt=1, max_len=4096, patch_size=4, feat_dim=64, audio_vae=vae)
    seen = set()
    for s, seg in segs:
        r = row[s.idx]
        seen.add(r)
        if r in (0, 1):             # own reference: rows 0 (no speaker at all) and 1 (a speaker with others)
            assert s.layout == "clone" and s.ref == OWN_REF
            clip = manifest["clips"][{0: 4, 1: 5}[r]][1]
            text = manifest["rows"][r]["text"].strip()
            out = packer(audio_tokens=torch.from_numpy(manifest["clips"][r][1])[None],
                         text_tokens=torch.tensor([tok(text)], dtype=torch.int32),
                         task_ids=torch.ones(1, dtype=torch.int32), dataset_ids=torch.zeros(1, dtype=torch.int32),
                         is_prompts=[False], ref_audio_tokens=torch.from_numpy(clip)[None])
            L = len(seg["text_tokens"])
            assert int(out["position_ids"][0].max()) + 1 == L
            for k in ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels"):
                np.testing.assert_array_equal(seg[k].numpy(), out[k][0, :L].numpy(), err_msg=f"row {r} {k}")
            torch.testing.assert_close(seg["audio_feats"], out["audio_feats"][0, :L].float(), rtol=2e-3, atol=2e-3)
        elif r == 2:                # no own reference: another utterance of its speaker
            assert s.layout == "clone" and s.ref == _key_of_row(ds)[1]
        else:                       # no reference, no speaker: tts
            assert s.layout == "tts" and s.ref == -1 and seg["text_tokens"][0] != 103
    assert seen == {0, 1, 2, 3}


def test_own_reference_with_continuation(encoded):
    """clone_continuation: the own clip is the reference, the prompt another utterance of the speaker;
    without a speaker the draw falls back to clone (the reference is still the sample's own)."""
    cfg = _cfg(encoded["dir"], LayoutProbs(0, 0, 0, 1))
    loader = VoxCPMDataLoader(cfg)
    ds = loader.datasets[0]
    row = _key_of_row(ds)
    segs = _segments(loader, VoxCPMDataLoader(cfg), 6)
    got = {}
    for s, seg in segs:
        got[s.idx] = s
        ids = seg["text_tokens"].tolist()
        if s.ref == OWN_REF:
            R = int(ds.ref_patches[s.idx])
            assert ids[0] == 103 and ids[R + 1] == 104
            ref = ds.ref_latent(s.idx).astype(np.float32)
            feats = seg["audio_feats"][1:R + 1].reshape(-1, 64)[:len(ref)].numpy()
            np.testing.assert_array_equal(feats, ref)
    s1, s0 = got[row[1]], got[row[0]]
    assert (s1.layout, s1.ref, s1.prompt) == ("clone_continuation", OWN_REF, row[2])
    assert s1.text_ids == TextTokenizer(TOKENIZER)(ds.plain_text(row[2]) + ds.plain_text(row[1]))
    assert (s0.layout, s0.ref, s0.prompt) == ("clone", OWN_REF, -1)
    assert got[row[3]].layout == "tts"
    # the assembled sequences are what the plan says (lengths checked by the assembler)
    _, plans = VoxCPMDataLoader(cfg).planner.next_window()
    MicroBatchAssembler(loader.datasets, cfg)[plans[0]]


def test_encode_with_vae_weights_does_not_warn(manifest, tmp_path, caplog):
    from safetensors.torch import save_file

    vae = LatentEncoder(EncodeOptions(vae_config="tiny", seed=1)).vae
    weights = tmp_path / "audiovae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(weights))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"audio": str(manifest["root"] / "wavs/c0.wav"), "text": "hello"}) + "\n")
    caplog.set_level("WARNING")
    run_encode([str(one)], str(tmp_path / "out"), EncodeOptions(vae_config="tiny", vae_path=str(weights)))
    assert not any("RANDOMLY" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "out/meta.json").read_text())["vae"]["weights"] == str(weights)
