"""Small reference folders built with the reference package itself (``voxcpm``, a test dependency).

Used by the conversion tests and CPU demos: a random ``VoxCPM2Model`` of any ``ModelConfig`` (e.g.
``configs/model/tiny.yaml``), a tiny AudioVAE V2 and a word-level ``LlamaTokenizerFast`` made with
the ``tokenizers`` library (no download).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from voxcpm_train.convert.folder import ReferenceFolder, export_reference_config, write_reference_folder

__all__ = ["TINY_AUDIO_VAE", "make_tokenizer", "write_tokenizer", "random_reference_model", "write_random_reference_folder"]

# AudioVAE V2 small enough to build in milliseconds (hop 10, 64 latent channels like the real one).
TINY_AUDIO_VAE = {
    "encoder_dim": 8,
    "encoder_rates": [2, 5],
    "latent_dim": 64,
    "decoder_dim": 16,
    "decoder_rates": [5, 2],
    "sample_rate": 16000,
    "out_sample_rate": 16000,
    "sr_bin_boundaries": None,
}


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_tokenizer(path, vocab_size: int) -> None:
    """A word-level ``LlamaTokenizerFast`` of ``vocab_size`` ids saved into ``path``."""
    make_tokenizer(vocab_size).save_pretrained(str(path))


def random_reference_model(model_config, audio_vae_config: Optional[dict] = None, seed: int = 0):
    """A ``voxcpm`` ``VoxCPM2Model`` (float32, CPU) of ``model_config`` with random weights
    (every parameter drawn, norms included, so conversions are checked on distinct values)."""
    from voxcpm.model.voxcpm2 import VoxCPM2Model, VoxCPMConfig
    from voxcpm.modules.audiovae import AudioVAEConfigV2, AudioVAEV2

    if model_config.architecture != "voxcpm2":
        raise ValueError("random_reference_model builds voxcpm2 models only")
    vae_cfg = dict(audio_vae_config or TINY_AUDIO_VAE)
    ref = export_reference_config(model_config, {"audio_vae_config": vae_cfg, "device": "cpu"}, dtype="float32")
    config = VoxCPMConfig.model_validate(ref)
    model = VoxCPM2Model(config, make_tokenizer(model_config.vocab_size), AudioVAEV2(AudioVAEConfigV2(**vae_cfg)), device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.float().eval()


def write_random_reference_folder(
    path, model_config, audio_vae_config: Optional[dict] = None, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a random reference folder for ``model_config`` at ``path``; ``VoxCPM2Model.from_local``
    loads it."""
    path = Path(path)
    model = random_reference_model(model_config, audio_vae_config, seed)
    sd = model.state_dict()
    vae_cfg = dict(audio_vae_config or TINY_AUDIO_VAE)
    config = export_reference_config(model_config, {"audio_vae_config": vae_cfg}, dtype=dtype)
    folder = ReferenceFolder(
        config=config,
        weights={k: v for k, v in sd.items() if not k.startswith("audio_vae.")},
        audio_vae={k[len("audio_vae."):]: v for k, v in sd.items() if k.startswith("audio_vae.")},
    )
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, model_config.vocab_size)
    write_reference_folder(path, folder, dtype=dtype)
    return path
