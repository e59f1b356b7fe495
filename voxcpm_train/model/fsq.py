"""Finite scalar quantization bottleneck of the TSLM output (`fsq_layer`)."""

from __future__ import annotations

import torch


class FSQ(torch.nn.Module):
    """`in_proj` (H -> latent), tanh, round(x·scale)/scale with a straight-through gradient in
    training, `out_proj` (latent -> H). [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, latent_dim: int, scale: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_proj = torch.nn.Linear(hidden_size, latent_dim, dtype=dtype)
        self.out_proj = torch.nn.Linear(latent_dim, hidden_size, dtype=dtype)
        self.scale = scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        latent = torch.tanh(self.in_proj(hidden))
        quantized = torch.round(latent * self.scale) / self.scale
        if self.training:
            quantized = latent + (quantized - latent).detach()
        return self.out_proj(quantized)
