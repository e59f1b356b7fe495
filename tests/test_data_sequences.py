"""Sequence builder == reference `AudioFeatureProcessingPacker` (TTS and reference-clone layouts);
tokenizer == reference `mask_multichar_chinese_tokens` wrapper."""
import numpy as np
import pytest
import torch

from data_pipeline.encode import EncodeOptions, LatentEncoder
from data_pipeline.sequences import build_sequence, sequence_length
from data_pipeline.tokenizer import TextTokenizer

voxcpm = pytest.importorskip("voxcpm")


def _load_reference_packers():
    """voxcpm/training/packers.py loaded on its own (the package __init__ wants argbind/datasets)."""
    import importlib.util
    from pathlib import Path
    path = Path(voxcpm.__file__).parent / "training" / "packers.py"
    spec = importlib.util.spec_from_file_location("voxcpm_reference_packers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


packers = _load_reference_packers()
TOKENIZER = "demo_data/tokenizer"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "今天天气很好，我们去公园散步吧。",
         "(温柔的年轻女声，语速平缓)我喜欢学习新的语言和文化。", "Hola, ¿cómo estás? 北京是中国的首都"]


def test_tokenizer_matches_reference_wrapper():
    from transformers import LlamaTokenizerFast
    from voxcpm.model.utils import mask_multichar_chinese_tokens
    ref = mask_multichar_chinese_tokens(LlamaTokenizerFast.from_pretrained(TOKENIZER))
    ours = TextTokenizer(TOKENIZER)
    assert ours.cjk_multichar, "demo tokenizer should hold multi-character Chinese tokens"
    for t in TEXTS:
        assert ours(t) == ref(t)
        assert ours.hf.bos_token_id not in ours(t)
    assert ours.hf.convert_ids_to_tokens([101, 102, 103, 104]) == [
        "<|audio_start|>", "<|audio_end|>", "<|ref_audio_start|>", "<|ref_audio_end|>"]


@pytest.fixture(scope="module")
def vae_and_encoder():
    enc = LatentEncoder(EncodeOptions(vae_config="tiny", seed=3))
    return enc.vae, enc


def _pad(seqs, value):
    n = max(len(s) for s in seqs)
    return torch.stack([torch.nn.functional.pad(s, (0, n - len(s)), value=value) for s in seqs])


@pytest.mark.parametrize("with_ref", [False, True])
def test_builder_matches_reference_packer(vae_and_encoder, with_ref):
    vae, encoder = vae_and_encoder
    tok = TextTokenizer(TOKENIZER)
    g = torch.Generator().manual_seed(0)
    lengths = [16000 * 2 + 77, 16000 + 2560 * 3, 5000, 12345]     # incl. exact patch multiples
    audios = [torch.randn(n, generator=g) * 0.2 for n in lengths]
    refs = [torch.randn(n, generator=g) * 0.2 for n in (9000, 20000, 2560 * 2, 7000)]
    text_ids = [torch.tensor(tok(t), dtype=torch.int32) for t in TEXTS]
    packer = packers.AudioFeatureProcessingPacker(dataset_cnt=1, max_len=4096, patch_size=4, feat_dim=64, audio_vae=vae)
    out = packer(audio_tokens=_pad(audios, -100.0), text_tokens=_pad(text_ids, -100),
                 task_ids=torch.ones(4, dtype=torch.int32), dataset_ids=torch.zeros(4, dtype=torch.int32),
                 is_prompts=[False] * 4, ref_audio_tokens=_pad(refs, -100.0) if with_ref else None)
    latents = encoder([a.numpy() for a in audios])
    ref_latents = encoder([a.numpy() for a in refs])
    for i in range(4):
        seq = build_sequence(text_ids[i].tolist(), latents[i], 4, ref=ref_latents[i] if with_ref else None)
        L = len(seq["text_tokens"])
        a, r = -(-latents[i].shape[0] // 4), -(-ref_latents[i].shape[0] // 4)
        assert L == sequence_length("clone" if with_ref else "tts", len(text_ids[i]), a, r)
        assert int(out["position_ids"][i].max()) + 1 == L
        for k in ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels"):
            np.testing.assert_array_equal(seq[k], out[k][i, :L].numpy(), err_msg=k)
        assert out["text_mask"][i, L:].sum() == 0 and out["audio_mask"][i, L:].sum() == 0
        # our latents are stored in float16; the packer keeps float32
        torch.testing.assert_close(torch.from_numpy(seq["audio_feats"]), out["audio_feats"][i, :L].float(),
                                   rtol=2e-3, atol=2e-3)
