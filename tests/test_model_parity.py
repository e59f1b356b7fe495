"""Reference parity: our megatron-core VoxCPMModel vs the reference `voxcpm` VoxCPM2Model (fp32, one
process), loaded from the same weights through `voxcpm_train.convert` (TP = PP = 1).

Draws: the reference draws inside `UnifiedCFM.compute_loss` from the global torch RNG, in this order
for N = B·T positions: cfg keep `rand(N) > rate`, noisy-cond `rand(N)`, `randn(N, D, P)` (scaled by 0),
`s_r = randn(N)`, `s_t = randn(N)`, the r≠t mask `rand(N)`, and the noise `z = randn(N, D, P)`;
nothing else in its training forward draws. `replay_reference_draws` re-seeds the RNG with the seed
given to the reference and replays that order into a `FlowDraws` that is injected into our model.
The loss comparison itself checks that the replay is right.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from voxcpm_train.config.model import RopeConfig, load_model_preset, to_reference_config

SEED = 777


def replay_reference_draws(seed: int, n: int, patch: int, dim: int, cfg_rate: float, t_mu: float, t_sigma: float):
    from voxcpm_train.model.losses import FlowDraws

    torch.manual_seed(seed)
    keep = (torch.rand(n) > cfg_rate).float()
    torch.rand(n)  # noisy-cond mask (probability 0)
    torch.randn(n, dim, patch)  # noisy-cond noise (scale 0)
    torch.randn(n)  # s_r
    t = torch.sigmoid(torch.randn(n) * t_sigma + t_mu)
    torch.rand(n)  # r != t mask (ratio 0)
    z = torch.randn(n, dim, patch)
    return FlowDraws(t=t, noise=z.transpose(1, 2).contiguous(), cfg_keep=keep)


def build_reference(cfg):
    """A tiny random reference model (its own init) on CPU, fp32, train mode: `VoxCPM2Model` for
    architecture voxcpm2, `VoxCPMModel` (v1) for voxcpm."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaTokenizerFast
    from voxcpm.modules.audiovae import AudioVAE, AudioVAEConfig, AudioVAEConfigV2, AudioVAEV2

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, cfg.vocab_size)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = LlamaTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    ref_json = to_reference_config(cfg, dtype="float32")
    ref_json["device"] = "cpu"
    small = dict(encoder_dim=4, encoder_rates=[2, 2], latent_dim=cfg.feat_dim, decoder_dim=8, decoder_rates=[2, 2])
    if cfg.architecture == "voxcpm2":
        from voxcpm.model.voxcpm2 import VoxCPM2Model as Model, VoxCPMConfig

        vae = AudioVAEV2(AudioVAEConfigV2(**small, sr_bin_boundaries=None, cond_dim=8))
    else:  # VoxCPM 0.5B (v1)
        from voxcpm.model.voxcpm import VoxCPMConfig, VoxCPMModel as Model

        vae = AudioVAE(AudioVAEConfig(**small))
    model = Model(VoxCPMConfig.model_validate(ref_json), tokenizer, vae, device="cpu")
    del model.audio_vae  # not part of model.safetensors; the training forward does not use it
    return model.float().train()


def make_sample(kind: str, P: int, D: int, gen: torch.Generator) -> dict:
    """One unpadded sample: tts `[text…, 101, audio×A, 102]` or reference clone
    `[103, ref×R, 104, text…, 101, audio×A, 102]`; loss and stop label on the target audio only."""
    def text(n):
        return [5 + int(x) for x in torch.randint(0, 90, (n,), generator=gen)]

    if kind == "tts":
        parts = [("text", text(4) + [101]), ("target", 5), ("text", [102])]
    elif kind == "clone":
        parts = [("text", [103]), ("prompt", 3), ("text", [104] + text(3) + [101]), ("target", 4), ("text", [102])]
    else:
        raise ValueError(kind)
    fields = {k: [] for k in ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels", "audio_feats")}
    for what, spec in parts:
        n = len(spec) if what == "text" else spec
        fields["text_tokens"] += spec if what == "text" else [0] * n
        fields["text_mask"] += [1.0 if what == "text" else 0.0] * n
        fields["audio_mask"] += [0.0 if what == "text" else 1.0] * n
        fields["loss_mask"] += [1.0 if what == "target" else 0.0] * n
        fields["labels"] += [0] * n
        if what == "target":
            fields["labels"][-1] = 1
        fields["audio_feats"].append(torch.zeros(n, P, D) if what == "text" else torch.randn(n, P, D, generator=gen))
    sample = {k: torch.tensor(v) for k, v in fields.items() if k != "audio_feats"}
    sample["text_tokens"] = sample["text_tokens"].long()
    sample["labels"] = sample["labels"].long()
    sample["audio_feats"] = torch.cat(fields["audio_feats"])
    return sample


def pack_row(samples, T: int) -> dict:
    """Samples packed into one row of T positions (position_ids restart, segment ids 1, 2, …; 0 = pad)."""
    length = sum(len(s["text_tokens"]) for s in samples)
    assert length <= T
    row = {}
    for key in samples[0]:
        body = torch.cat([s[key] for s in samples])
        pad = torch.zeros((T - length, *body.shape[1:]), dtype=body.dtype)
        row[key] = torch.cat([body, pad])
    row["position_ids"] = torch.cat([torch.arange(len(s["text_tokens"])) for s in samples] + [torch.zeros(T - length, dtype=torch.long)])
    row["segment_ids"] = torch.cat(
        [torch.full((len(s["text_tokens"]),), i + 1) for i, s in enumerate(samples)] + [torch.zeros(T - length, dtype=torch.long)]
    )
    return row


def stack_rows(rows):
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["row_seeds"] = torch.arange(len(rows))
    return batch


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (b the reference)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_model_preset("tiny")


def run_parity(cfg, batch):
    from voxcpm_train.convert.mapping import reference_to_ours
    from voxcpm_train.model import VoxCPMModel

    torch.manual_seed(0)
    ref = build_reference(cfg)
    ours = VoxCPMModel(cfg).train()
    ref_sd = {k: v for k, v in ref.state_dict().items()}
    missing, unexpected = ours.load_state_dict(reference_to_ours(ref_sd, cfg), strict=True)
    assert not missing and not unexpected

    B, T, P, D = batch["audio_feats"].shape
    torch.manual_seed(SEED)
    ref_out = ref(
        batch["text_tokens"], batch["text_mask"], batch["audio_feats"], batch["audio_mask"],
        batch["loss_mask"], batch["position_ids"], batch["labels"],
    )
    (ref_out["loss/diff"] + ref_out["loss/stop"]).backward()

    draws = replay_reference_draws(SEED, B * T, P, D, cfg.flow.cfg_rate, cfg.flow.t_mu, cfg.flow.t_sigma)
    assert draws.cfg_keep.min() == 0, "the batch should exercise CFG dropout"
    out = ours(batch, draws=draws)
    n = out["num_loss_positions"]
    diff, stop = out["diff_sum"] / n, out["stop_sum"] / n
    (diff + stop).backward()

    errors = {
        "loss/diff": abs(float(diff) - float(ref_out["loss/diff"])) / abs(float(ref_out["loss/diff"])),
        "loss/stop": abs(float(stop) - float(ref_out["loss/stop"])) / abs(float(ref_out["loss/stop"])),
    }
    ref_grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in ref.named_parameters()}
    ours_grads = reference_to_ours(ref_grads, cfg)
    grad_errors = {}
    for name, p in ours.named_parameters():
        expected = ours_grads[name]
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        if expected.abs().max() == 0:
            assert got.abs().max() == 0, f"{name}: reference grad is zero, ours is not"
            continue
        grad_errors[name] = max_rel(got, expected)
    return errors, grad_errors, len(list(ours.parameters()))


V1 = dict(architecture="voxcpm", patch_size=2, residual_lm_no_rope=False, use_mup=True)
# max > original: long factors and the LongRoPE attention factor sqrt(1 + ln 2 / ln 4096) are in use.
LONG_ROPE = dict(
    rope=RopeConfig(
        theta=10000.0, max_position_embeddings=8192, original_max_position_embeddings=4096,
        short_factor=[1.0] * 8, long_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0],
    ),
    residual_lm_no_rope=False,
)


@pytest.mark.parametrize(
    "kinds,changes",
    [
        (("tts", "tts"), {}),
        (("clone", "tts"), {}),
        (("clone", "clone"), {"use_mup": True}),
        (("tts", "tts"), V1),
        (("clone", "tts"), LONG_ROPE),
    ],
    ids=["tts", "clone+tts", "clone-mup", "v1-tts-mup", "long-rope"],
)
def test_reference_parity(megatron_single, tiny_cfg, kinds, changes):
    cfg = dataclasses.replace(tiny_cfg, **changes)
    gen = torch.Generator().manual_seed(3)
    T = 16
    rows = [pack_row([make_sample(kind, cfg.patch_size, cfg.feat_dim, gen)], T) for kind in kinds]
    errors, grad_errors, n_params = run_parity(cfg, stack_rows(rows))
    worst = max(grad_errors, key=grad_errors.get)
    print(f"\n{kinds} {changes}: loss rel err {errors}; worst grad rel err {grad_errors[worst]:.2e} ({worst})")
    assert errors["loss/diff"] < 1e-5 and errors["loss/stop"] < 1e-5, errors
    assert grad_errors[worst] < 1e-4, (worst, grad_errors[worst])
    assert len(grad_errors) == n_params, "every parameter should receive a gradient"


def test_bf16_close_to_fp32_reference(megatron_single, tiny_cfg):
    """bf16 weights and activations (RMSNorm variance, RoPE and losses in fp32): losses within 5e-3
    of the fp32 reference, finite bf16 grads."""
    from voxcpm_train.convert.mapping import reference_to_ours
    from voxcpm_train.model import VoxCPMModel

    cfg = dataclasses.replace(tiny_cfg, params_dtype="bfloat16")
    gen = torch.Generator().manual_seed(3)
    batch = stack_rows([pack_row([make_sample(k, cfg.patch_size, cfg.feat_dim, gen)], 16) for k in ("clone", "tts")])
    torch.manual_seed(0)
    ref = build_reference(dataclasses.replace(cfg, params_dtype="float32"))
    ours = VoxCPMModel(cfg).train()
    ours.load_state_dict(reference_to_ours({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}, cfg))
    B, T, P, D = batch["audio_feats"].shape
    torch.manual_seed(SEED)
    ref_out = ref(
        batch["text_tokens"], batch["text_mask"], batch["audio_feats"], batch["audio_mask"],
        batch["loss_mask"], batch["position_ids"], batch["labels"],
    )
    draws = replay_reference_draws(SEED, B * T, P, D, cfg.flow.cfg_rate, cfg.flow.t_mu, cfg.flow.t_sigma)
    out = ours(batch, draws=draws)
    n = out["num_loss_positions"]
    (out["diff_sum"] / n + out["stop_sum"] / n).backward()
    err = {
        "diff": abs(float(out["diff_sum"] / n) / float(ref_out["loss/diff"]) - 1),
        "stop": abs(float(out["stop_sum"] / n) / float(ref_out["loss/stop"]) - 1),
    }
    print(f"\nbf16 vs fp32 reference: loss rel err {err}")
    assert max(err.values()) < 5e-3, err
    for name, p in ours.named_parameters():
        assert p.dtype == torch.bfloat16 and p.grad is not None and torch.isfinite(p.grad).all(), name
