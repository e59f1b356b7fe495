"""LocDiT (`feat_decoder.estimator`): the velocity field of one latent patch given its conditions."""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule

from voxcpm_train.model.rope import LongRoPE
from voxcpm_train.model.transformer import StackBlock


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """[N] times in [0, 1] -> [N, dim] = cat(sin, cos) of scale·t·10000^(-i/(dim/2-1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=t.dtype, device=t.device) * -(math.log(10000) / (half - 1)))
    angles = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimestepMLP(torch.nn.Module):
    """`linear_1` -> SiLU -> `linear_2` (H -> H)."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = torch.nn.Linear(hidden, hidden, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(torch.nn.functional.silu(self.linear_1(x)))


class LocalDiT(MegatronModule):
    """Bidirectional stack over `[mu ×C, time_emb + dt_emb, cond ×P, x_t ×P]` (C = 2 condition tokens
    for voxcpm2; for voxcpm v1 C = 1 and the time embedding is added to mu), `out_proj` on the last P.

    `forward(x_t [N, P, D], mu [N, C, H], t [N], cond [N, P, D]) -> velocity [N, P, D]`. No mask, no
    packing (each of the N positions is its own short sequence). `impl`: the layer spec.
    """

    def __init__(self, block_config, core_attention, rope_config, feat_dim: int, residual_scale: float, time_in_mu: bool,
                 impl: str = "local"):
        super().__init__(config=block_config)
        hidden = block_config.hidden_size
        dtype = block_config.params_dtype
        self.in_proj = torch.nn.Linear(feat_dim, hidden, dtype=dtype)
        self.cond_proj = torch.nn.Linear(feat_dim, hidden, dtype=dtype)
        self.out_proj = torch.nn.Linear(hidden, feat_dim, dtype=dtype)
        self.time_mlp = TimestepMLP(hidden, dtype)
        self.delta_time_mlp = TimestepMLP(hidden, dtype)
        self.decoder = StackBlock(
            block_config, core_attention, causal=False, residual_scale=residual_scale,
            first_layer=0, num_layers=block_config.num_layers, total_layers=block_config.num_layers, final_norm=True,
            impl=impl,
        )
        self.rope = LongRoPE(block_config.kv_channels, rope_config, fused=impl == "te")
        self.hidden = hidden
        self.time_in_mu = time_in_mu

    def forward(self, x_t: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x_t)
        cond = self.cond_proj(cond)
        time = self.time_mlp(sinusoidal_embedding(t, self.hidden).to(x.dtype))
        # dt = t - r is 0 without mean-velocity training; its MLP output still enters (as in the reference).
        delta = self.delta_time_mlp(sinusoidal_embedding(torch.zeros_like(t), self.hidden).to(x.dtype))
        time = (time + delta).unsqueeze(1)
        prefix = [mu + time] if self.time_in_mu else [mu, time]
        tokens = torch.cat(prefix + [cond, x], dim=1).transpose(0, 1).contiguous()  # [S, N, H]
        positions = torch.arange(tokens.shape[0], device=x.device).unsqueeze(0)
        out = self.decoder(tokens, attention_mask=None, rotary_pos_emb=self.rope(positions))
        patch = x_t.shape[1]
        return self.out_proj(out[-patch:].transpose(0, 1))


class FeatDecoder(MegatronModule):
    """Holds the LocDiT as `estimator` (the reference's `UnifiedCFM` wrapper name)."""

    def __init__(self, estimator: LocalDiT):
        super().__init__(config=estimator.config)
        self.estimator = estimator
