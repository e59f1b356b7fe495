"""AudioVAE V2 (ours) vs the reference implementation: key layout, parameter counts, encode/decode numerics."""
import pytest
import torch

from data_pipeline.audio_vae import AudioVAEConfig, AudioVAEV2, load_audio_vae

ref_mod = pytest.importorskip("voxcpm.modules.audiovae.audio_vae_v2")


def _reference(cfg: AudioVAEConfig):
    return ref_mod.AudioVAE(ref_mod.AudioVAEConfig(**cfg.to_dict()))


def test_full_size_parameter_counts_meta():
    with torch.device("meta"):
        vae = AudioVAEV2(AudioVAEConfig.preset("full"))
    assert sum(p.numel() for p in vae.encoder.parameters()) == 48_435_072
    assert sum(p.numel() for p in vae.parameters()) == 94_213_954
    with torch.device("meta"):
        ref = _reference(AudioVAEConfig.preset("full"))
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in vae.state_dict().items()}


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_encode_decode_match_reference(preset, tmp_path):
    cfg = AudioVAEConfig.preset(preset)
    torch.manual_seed(0)
    ref = _reference(cfg).eval()
    with torch.no_grad():  # non-trivial weight-norm gains and snake alphas
        for name, p in ref.named_parameters():
            if name.endswith("weight_g") or name.endswith("alpha"):
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    from safetensors.torch import save_file
    path = tmp_path / "audiovae.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours, prov = load_audio_vae(str(path), cfg, with_decoder=True)
    assert prov["weights"] == str(path)
    enc_only, _ = load_audio_vae(str(path), cfg, with_decoder=False)   # encoder keys load strictly alone
    audio = torch.randn(2, 16000 + 123) * 0.3
    with torch.no_grad():
        z_ref = ref.encode(audio.unsqueeze(1), 16000)
        z = ours.encode(audio, 16000)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc_only.encode(audio), z_ref, rtol=1e-5, atol=1e-5)
        assert z.shape == (2, 64, 26)
        if preset != "tiny":
            return
        y_ref = ref.decode(z_ref[:, :, :5])
        y = ours.decode(z_ref[:, :, :5])
        assert y.shape == (2, 1, 5 * 1920)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_batched_right_padding_is_exact():
    """Causal encoder: a sample's frames do not depend on the padding after it (batched encode)."""
    torch.manual_seed(1)
    vae = AudioVAEV2(AudioVAEConfig.preset("tiny"), with_decoder=False).eval()
    a = torch.randn(1, 2560 * 3)
    with torch.no_grad():
        alone = vae.encode(a)
        padded = vae.encode(torch.cat([a, torch.zeros(1, 2560 * 2)], 1))[:, :, : alone.shape[-1]]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-6)


def test_rejects_wrong_rate_and_mismatched_weights(tmp_path):
    vae = AudioVAEV2(AudioVAEConfig.preset("tiny"), with_decoder=False)
    with pytest.raises(ValueError, match="16000 Hz"):
        vae.encode(torch.zeros(1, 640), 48000)
    from safetensors.torch import save_file
    path = tmp_path / "small.safetensors"
    save_file(AudioVAEV2(AudioVAEConfig.preset("small")).state_dict(), str(path))
    with pytest.raises((ValueError, RuntimeError)):
        load_audio_vae(str(path), AudioVAEConfig.preset("tiny"))
    with pytest.raises(ValueError, match="safetensors"):
        load_audio_vae(str(tmp_path / "x.pth"), AudioVAEConfig.preset("tiny"))
