"""Generate the bundled demo corpus (demo_data/): espeak-ng speech in 6 languages / 7 voices, stored in the
Emilia layout (webdataset tars of `<id>.{ogg,mp3,flac}` + `<id>.json`), plus a small LlamaTokenizerFast-
compatible BPE tokenizer trained on its texts (ids 101-104 reserved for the audio special tokens).

    apt-get install -y espeak-ng   # Debian package
    python -m data_pipeline.scripts.make_demo_corpus --out demo_data
    python -m data_pipeline.scripts.make_demo_corpus --out demo_data --metadata-only  # JSON only

Every utterance gets a deterministic, Emilia-like DNSMOS value (`demo_dnsmos`: 3.0-3.75 from a hash of its
id; Emilia itself keeps clips with DNSMOS >= 3.0), so quality filters (`min_dnsmos: 3.4` keeps 21 of the
45) have something to split. `--metadata-only` rewrites the `<id>.json` members of the existing tars with
the current metadata and keeps every audio member byte-identical (no espeak-ng needed).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from data_pipeline.shards import json_bytes, tar_bytes

# speaker -> (espeak voice, language tag, speed wpm, stored format, sample rate)
VOICES = {
    "en_alex": ("en-us+m3", "en", 165, "ogg", 24000),
    "en_lucy": ("en-gb+f3", "en", 150, "mp3", 24000),
    "de_hans": ("de+m2", "de", 150, "ogg", 16000),
    "fr_claire": ("fr-fr+f2", "fr", 155, "flac", 16000),
    "es_pablo": ("es+m1", "es", 160, "ogg", 24000),
    "zh_mei": ("cmn+f4", "zh", 150, "ogg", 24000),
    "it_marco": ("it+m4", "it", 160, "mp3", 16000),
}

TEXTS = {
    "en": ["The quick brown fox jumps over the lazy dog.",
           "Training a speech model needs many hours of clean audio.",
           "Please remember to bring your umbrella tomorrow morning.",
           "The weather was sunny, and the children played in the park.",
           "We measured the throughput of the loader on two processor cores.",
           "Every sentence in this corpus was synthesized by a small speech engine.",
           "She sells sea shells by the sea shore.",
           "A journey of a thousand miles begins with a single step."],
    "de": ["Guten Morgen, wie geht es Ihnen heute?",
           "Das Wetter in Berlin ist heute kalt und windig.",
           "Wir trainieren ein Sprachmodell mit vielen Daten.",
           "Der Zug nach Hamburg fährt um acht Uhr ab.",
           "Ich lese gern Bücher am Abend.",
           "Die Katze schläft auf dem warmen Sofa."],
    "fr": ["Bonjour, je m'appelle Claire et j'habite à Paris.",
           "Le chat dort sur le canapé du salon.",
           "Nous apprenons à parler plusieurs langues.",
           "Il fait beau aujourd'hui, allons nous promener.",
           "La bibliothèque ferme à six heures du soir.",
           "Merci beaucoup pour votre aide précieuse."],
    "es": ["Hola, ¿cómo estás? Espero que tengas un buen día.",
           "El tren sale de la estación a las nueve.",
           "Me gusta caminar por la playa al atardecer.",
           "La música suena muy bien en esta sala.",
           "Mañana vamos a visitar a nuestros abuelos.",
           "El perro corre detrás de la pelota roja."],
    "zh": ["今天天气很好，我们去公园散步吧。",
           "我喜欢学习新的语言和文化。",
           "这个模型可以把文字变成声音。",
           "请在明天早上八点之前到达会议室。",
           "北京是中国的首都，有很多名胜古迹。",
           "我们一起吃晚饭，然后看电影。"],
    "it": ["Buongiorno, come stai oggi?",
           "La pizza napoletana è famosa in tutto il mondo.",
           "Domani andiamo al mare con gli amici.",
           "Il treno per Roma parte alle dieci.",
           "Mi piace leggere libri la sera."],
}

# voice-design samples: (speaker, text index) -> natural-language description
DESCRIPTIONS = {
    ("en_alex", 0): "A calm middle-aged male voice, clear American accent, moderate pace",
    ("en_lucy", 2): "A bright young female voice with a British accent, speaking gently",
    ("zh_mei", 1): "温柔的年轻女声，语速平缓",
}


def demo_dnsmos(uid: str) -> float:
    """A stand-in DNSMOS (P.835 OVRL) score for a synthetic clip: uniform in [3.0, 3.75) from sha256(id)."""
    u = int.from_bytes(hashlib.sha256(uid.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return round(3.0 + 0.75 * u, 4)


def demo_metadata(uid: str, spk: str, i: int, text: str, duration: float) -> dict:
    meta = {"id": uid, "text": " " + text, "duration": duration, "speaker": spk, "language": VOICES[spk][1],
            "dnsmos": demo_dnsmos(uid)}
    if (spk, i) in DESCRIPTIONS:
        meta["description"] = DESCRIPTIONS[(spk, i)]
    return meta


def synthesize(voice: str, speed: int, text: str) -> tuple[np.ndarray, int]:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         check=True, capture_output=True).stdout
    # espeak writes a streaming WAV header with a bogus size; soundfile reads it fine
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, sr


def encode_audio(audio: np.ndarray, sr: int, fmt: str, out_sr: int) -> bytes:
    audio = AF.resample(torch.from_numpy(audio), sr, out_sr).numpy()
    audio = np.clip(audio * 0.9, -1, 1)
    buf = io.BytesIO()
    if fmt == "ogg":
        sf.write(buf, audio, out_sr, format="OGG", subtype="VORBIS", compression_level=0.9)
    elif fmt == "mp3":
        sf.write(buf, audio, out_sr, format="MP3", subtype="MPEG_LAYER_III", compression_level=0.9,
                 bitrate_mode="VARIABLE")
    else:
        sf.write(buf, audio, out_sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_corpus(out: Path, shards: int = 2) -> list[dict]:
    members: list[list[tuple[str, bytes]]] = [[] for _ in range(shards)]
    metas = []
    n = 0
    for spk, (voice, lang, speed, fmt, out_sr) in VOICES.items():
        for i, text in enumerate(TEXTS[lang]):
            audio, sr = synthesize(voice, speed, text)
            uid = f"{lang.upper()}_{spk}_{i:04d}"
            data = encode_audio(audio, sr, fmt, out_sr)
            meta = demo_metadata(uid, spk, i, text, round(len(audio) / sr, 3))
            members[n % shards] += [(f"{uid}.{fmt}", data), (f"{uid}.json", json_bytes(meta))]
            metas.append(meta)
            n += 1
    out.mkdir(parents=True, exist_ok=True)
    for s, m in enumerate(members):
        (out / f"demo-{s:06d}.tar").write_bytes(tar_bytes(m))
    return metas


def rewrite_metadata(folder: Path) -> list[dict]:
    """Rewrite the `<id>.json` members of the corpus tars in `folder` with `demo_metadata` (text and
    duration as stored); audio members and member order are kept byte for byte."""
    metas = []
    for path in sorted(folder.glob("demo-*.tar")):
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        out = []
        for name, data in members:
            if name.endswith(".json"):
                old = json.loads(data)
                spk, uid = old["speaker"], old["id"]
                meta = demo_metadata(uid, spk, int(uid.rsplit("_", 1)[1]), old["text"][1:], old["duration"])
                if meta["text"] != old["text"]:
                    raise ValueError(f"{path}/{name}: unexpected text {old['text']!r}")
                data = json_bytes(meta)
                metas.append(meta)
            out.append((name, data))
        new = tar_bytes(out)
        if new != path.read_bytes():
            path.write_bytes(new)
    return metas


def make_tokenizer(out: Path, texts: list[str], vocab_size: int = 1500) -> None:
    """BPE with a Llama-style metaspace ('▁'), byte fallback, ids 0-2 <unk>/<s>/</s>, 3-127 reserved
    (101-104 = audio start/end, ref start/end), learned pieces from 128."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    special = ["<unk>", "<s>", "</s>"] + [f"<|reserved_{i}|>" for i in range(3, 128)]
    special[101:105] = ["<|audio_start|>", "<|audio_end|>", "<|ref_audio_start|>", "<|ref_audio_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(byte_tokens), special_tokens=special + byte_tokens,
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                      "single_word": False} for i, t in enumerate(special)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "model_max_length": 8192, "legacy": False, "added_tokens_decoder": added}, indent=1) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_data")
    ap.add_argument("--metadata-only", action="store_true",
                    help="rewrite only the JSON metadata of the existing tars (audio and tokenizer kept)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.metadata_only:
        metas = rewrite_metadata(out / "emilia")
        hq = sum(m["dnsmos"] >= 3.4 for m in metas)
        print(f"{len(metas)} utterances' metadata rewritten in {out / 'emilia'} ({hq} with dnsmos >= 3.4)")
        return
    metas = make_corpus(out / "emilia")
    texts = [m["text"].strip() for m in metas] + [f"({m['description']}){m['text'].strip()}" for m in metas if "description" in m]
    texts += [t for lang in TEXTS.values() for t in lang]
    make_tokenizer(out / "tokenizer", texts)
    hours = sum(m["duration"] for m in metas) / 3600
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(metas)} utterances, {hours * 60:.1f} min, {len({m['speaker'] for m in metas})} speakers, "
          f"{len({m['language'] for m in metas})} languages, {size / 1e6:.2f} MB in {out}")


if __name__ == "__main__":
    main()
