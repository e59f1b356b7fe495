"""AudioVAE V2 (VoxCPM2's frozen audio codec): causal conv encoder 16 kHz -> 25 Hz x 64 latents (mean),
and causal conv decoder 25 Hz latents -> 48 kHz audio conditioned on an output-rate bucket.

Module names and parameter layout follow the released `audiovae.safetensors` (weight-normed convs store
`weight_g` [C_out(or C_in for transposed), 1, 1] and `weight_v`), so it loads strictly.
Full size (released config): 94,213,954 parameters, encoder 48,435,072.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AudioVAEConfig:
    encoder_dim: int = 128
    encoder_rates: list = field(default_factory=lambda: [2, 5, 8, 8])
    latent_dim: int = 64
    decoder_dim: int = 2048
    decoder_rates: list = field(default_factory=lambda: [8, 6, 5, 2, 2, 2])
    depthwise: bool = True
    sample_rate: int = 16000
    out_sample_rate: int = 48000
    sr_bin_boundaries: Optional[list] = field(default_factory=lambda: [20000, 30000, 40000])

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str) -> "AudioVAEConfig":
        """`full`: the released VoxCPM2 codec. `small`: same rates/latent, 8x narrower (CPU demos).
        `tiny`: 16x narrower (tests)."""
        if name == "full":
            return cls()
        if name == "small":
            return cls(encoder_dim=16, decoder_dim=256)
        if name == "tiny":
            return cls(encoder_dim=8, decoder_dim=128)
        raise ValueError(f"unknown AudioVAE preset {name!r} (full | small | tiny)")


def _weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """w = g * v / ||v||, norm over every dim but 0 (torch.nn.utils.weight_norm with dim=0)."""
    return v * (g / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1))))


class CausalConv1d(nn.Module):
    """Weight-normed Conv1d, left-padded by `left_pad` samples: out[t] sees only in[<= t*stride+...]."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, dilation=1, groups=1, bias=True, left_pad=0):
        super().__init__()
        w = torch.empty(c_out, c_in // groups, kernel_size)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight_v = nn.Parameter(w)
        self.weight_g = nn.Parameter(w.flatten(1).norm(dim=1).view(-1, 1, 1).clone())
        if bias:
            bound = 1 / math.sqrt((c_in // groups) * kernel_size)
            self.bias = nn.Parameter(torch.empty(c_out).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.stride, self.dilation, self.groups, self.left_pad = stride, dilation, groups, left_pad

    def forward(self, x):  # [B, C_in, N] -> [B, C_out, N // stride]
        w = _weight_norm(self.weight_v, self.weight_g)
        return F.conv1d(F.pad(x, (self.left_pad, 0)), w, self.bias, self.stride, 0, self.dilation, self.groups)


class CausalConvTranspose1d(nn.Module):
    """Weight-normed ConvTranspose1d whose last `right_trim` output samples are dropped (causal)."""

    def __init__(self, c_in, c_out, kernel_size, stride, right_trim):
        super().__init__()
        w = torch.empty(c_in, c_out, kernel_size)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight_v = nn.Parameter(w)
        self.weight_g = nn.Parameter(w.flatten(1).norm(dim=1).view(-1, 1, 1).clone())
        bound = 1 / math.sqrt(c_out * kernel_size)
        self.bias = nn.Parameter(torch.empty(c_out).uniform_(-bound, bound))
        self.stride, self.right_trim = stride, right_trim

    def forward(self, x):  # [B, C_in, T] -> [B, C_out, T * stride]
        w = _weight_norm(self.weight_v, self.weight_g)
        return F.conv_transpose1d(x, w, self.bias, self.stride)[..., : -self.right_trim]


class Snake1d(nn.Module):
    """x + sin^2(alpha x) / alpha, per channel."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(dilated causal conv k7(snake(x))))."""

    def __init__(self, dim, dilation, groups):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            CausalConv1d(dim, dim, 7, dilation=dilation, groups=groups, left_pad=6 * dilation),
            Snake1d(dim),
            CausalConv1d(dim, dim, 1),
        )

    def forward(self, x):
        return x + self.block(x)


def _strided_left_pad(stride: int) -> int:
    return 2 * math.ceil(stride / 2) - stride % 2  # == stride


class EncoderBlock(nn.Module):
    """3 residual units at `dim // 2` channels, then a stride-`stride` conv to `dim` channels."""

    def __init__(self, dim, stride, depthwise):
        super().__init__()
        c_in = dim // 2
        groups = c_in if depthwise else 1
        self.block = nn.Sequential(
            ResidualUnit(c_in, 1, groups), ResidualUnit(c_in, 3, groups), ResidualUnit(c_in, 9, groups),
            Snake1d(c_in),
            CausalConv1d(c_in, dim, 2 * stride, stride=stride, left_pad=_strided_left_pad(stride)),
        )

    def forward(self, x):
        return self.block(x)


class Encoder(nn.Module):
    """[B, 1, N] 16 kHz (N a multiple of the hop) -> mu [B, latent_dim, N / hop]."""

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        dim = cfg.encoder_dim
        blocks = [CausalConv1d(1, dim, 7, left_pad=6)]
        for stride in cfg.encoder_rates:
            dim *= 2
            blocks.append(EncoderBlock(dim, stride, cfg.depthwise))
        self.block = nn.Sequential(*blocks)
        self.fc_mu = CausalConv1d(dim, cfg.latent_dim, 3, left_pad=2)
        self.fc_logvar = CausalConv1d(dim, cfg.latent_dim, 3, left_pad=2)  # unused at inference; kept for the checkpoint

    def forward(self, x):
        return self.fc_mu(self.block(x))


class DecoderBlock(nn.Module):
    """snake -> stride-`stride` causal transposed conv -> 3 residual units."""

    def __init__(self, c_in, c_out, stride, depthwise):
        super().__init__()
        groups = c_out if depthwise else 1
        self.input_channels = c_in
        self.block = nn.Sequential(
            Snake1d(c_in),
            CausalConvTranspose1d(c_in, c_out, 2 * stride, stride, right_trim=_strided_left_pad(stride)),
            ResidualUnit(c_out, 1, groups), ResidualUnit(c_out, 3, groups), ResidualUnit(c_out, 9, groups),
        )

    def forward(self, x):
        return self.block(x)


class SampleRateCondition(nn.Module):
    """x * scale[bucket] + bias[bucket] (per channel)."""

    def __init__(self, dim, buckets):
        super().__init__()
        self.scale_embed = nn.Embedding(buckets, dim)
        self.bias_embed = nn.Embedding(buckets, dim)
        nn.init.ones_(self.scale_embed.weight)
        nn.init.zeros_(self.bias_embed.weight)

    def forward(self, x, bucket):
        return x * self.scale_embed(bucket).unsqueeze(-1) + self.bias_embed(bucket).unsqueeze(-1)


class Decoder(nn.Module):
    """latents [B, latent_dim, T] -> audio [B, 1, T * prod(decoder_rates)] in [-1, 1]."""

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        c, d = cfg.latent_dim, cfg.decoder_dim
        if cfg.depthwise:
            layers = [CausalConv1d(c, c, 7, groups=c, left_pad=6), CausalConv1d(c, d, 1)]
        else:
            layers = [CausalConv1d(c, d, 7, left_pad=6)]
        for i, stride in enumerate(cfg.decoder_rates):
            layers.append(DecoderBlock(d // 2**i, d // 2 ** (i + 1), stride, cfg.depthwise))
        c_out = d // 2 ** len(cfg.decoder_rates)
        layers += [Snake1d(c_out), CausalConv1d(c_out, 1, 7, left_pad=6), nn.Tanh()]
        self.model = nn.ModuleList(layers)
        self.register_buffer("sr_bin_boundaries", torch.tensor(cfg.sr_bin_boundaries, dtype=torch.int32))
        buckets = len(cfg.sr_bin_boundaries) + 1
        self.sr_cond_model = nn.ModuleList(
            SampleRateCondition(l.input_channels, buckets) if isinstance(l, DecoderBlock) else None
            for l in layers
        )

    def forward(self, z, out_sample_rate: torch.Tensor):
        bucket = torch.bucketize(out_sample_rate, self.sr_bin_boundaries)
        for layer, cond in zip(self.model, self.sr_cond_model):
            if cond is not None:
                z = cond(z, bucket)
            z = layer(z)
        return z


class AudioVAEV2(nn.Module):
    """The VoxCPM2 codec. `encode`: [B, N] or [B, 1, N] 16 kHz -> [B, 64, ceil(N / 640)] (25 Hz).
    `decode`: [B, 64, T] -> [B, 1, T * 1920] at `out_sample_rate` (48 kHz)."""

    def __init__(self, config: AudioVAEConfig | None = None, with_decoder: bool = True):
        super().__init__()
        self.config = config or AudioVAEConfig()
        if self.config.sr_bin_boundaries is None:
            raise ValueError("AudioVAE V2 needs sr_bin_boundaries")
        self.hop_length = self.config.hop_length
        self.sample_rate = self.config.sample_rate
        self.latent_dim = self.config.latent_dim
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config) if with_decoder else None

    def encode(self, audio: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(f"AudioVAE V2 encodes {self.sample_rate} Hz audio, got {sample_rate} Hz")
        if audio.dim() == 2:
            audio = audio.unsqueeze(1)
        n = audio.shape[-1]
        audio = F.pad(audio, (0, math.ceil(n / self.hop_length) * self.hop_length - n))
        return self.encoder(audio)

    def decode(self, z: torch.Tensor, out_sample_rate: int | None = None) -> torch.Tensor:
        if self.decoder is None:
            raise RuntimeError("this AudioVAEV2 was built without its decoder")
        sr = torch.tensor([out_sample_rate or self.config.out_sample_rate], dtype=torch.int32, device=z.device)
        return self.decoder(z, sr)


def state_fingerprint(state: dict) -> str:
    """sha256 (16 hex digits) of an AudioVAE state dict: every tensor's name, shape and float32 values, in
    name order. The same for a file and any re-saved copy of it (e.g. an import's hf_assets)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def load_audio_vae(path: str | None, config: AudioVAEConfig, with_decoder: bool = True,
                   seed: int = 0, fingerprint: bool = False) -> tuple[AudioVAEV2, dict]:
    """Build the codec; load `path` (safetensors, strict for the built parts) or seed a random init.

    Returns (model in eval mode, provenance dict for output metadata; with `fingerprint`, a loaded file's
    `state_fingerprint` is recorded in it: one pass over every tensor, done when encoding).
    """
    if path is None:
        torch.manual_seed(seed)
        vae = AudioVAEV2(config, with_decoder).eval()
        return vae, {"weights": "random_init", "seed": seed, "config": config.to_dict()}
    from safetensors.torch import load_file

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: only .safetensors weights are loaded (no pickles)")
    state = load_file(str(path))
    provenance = {"weights": str(path), "config": config.to_dict()}
    if fingerprint:
        provenance["fingerprint"] = state_fingerprint(state)
    vae = AudioVAEV2(config, with_decoder)
    wanted = set(vae.state_dict())
    state = {k: v for k, v in state.items() if k in wanted or with_decoder}
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not match AudioVAE V2 {config}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return vae.eval(), provenance
