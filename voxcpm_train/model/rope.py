"""LongRoPE for megatron-core attention: rotate-half RoPE with per-dimension frequency factors.

The rotation angles `position · inv_freq / factor` are computed in fp32 from per-row `position_ids`
[B, T] (in the THD layout [1, B·T]) so packed samples keep their own positions. The local layer spec
gets cos/sin and rotates q and k in fp32 (as the reference does) with `apply_rope_fp32`; the Transformer
Engine spec gets the fp32 angles themselves (`LongRoPE(..., fused=True)`), which TE's fused RoPE kernel
turns into cos/sin and applies in fp32 (both from `LongRoPESelfAttention`, layer_spec.py). The LongRoPE attention factor s (1.0 for the released model)
scales cos and sin; q·k then grows by s², which `longrope_softmax_scale` folds into the softmax scale.
"""

from __future__ import annotations

import math

import torch

from voxcpm_train.config.model import RopeConfig, rope_factors, rope_scaling_factor


class LongRoPE(torch.nn.Module):
    """`forward(position_ids [B, T] int)` -> cos_sin [2, T, B, 1, head_dim] (fp32), or with `fused=True`
    the angles [T, B, 1, head_dim] (fp32, the `freqs` of TE's fused RoPE; B must be 1 there).

    The per-dimension frequencies are non-persistent buffers (built once, moved with the module, never
    in a checkpoint); only the positions' outer product is computed per call.
    """

    def __init__(self, head_dim: int, rope: RopeConfig, fused: bool = False):
        super().__init__()
        self.fused = fused
        factors = rope_factors(rope) or [1.0] * (head_dim // 2)
        if len(factors) != head_dim // 2:
            raise ValueError(f"model.rope: {len(factors)} factors for head dim {head_dim}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / (float(rope.theta) ** exponents), persistent=False)
        self.register_buffer(
            "inv_factors", 1.0 / torch.tensor([float(f) for f in factors], dtype=torch.float32), persistent=False
        )

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [T, B, 1, head_dim] fp32 angles in the rotate-half layout (each frequency twice)."""
        pos = position_ids.to(device=self.inv_freq.device, dtype=torch.float32)
        freqs = (pos.unsqueeze(-1) * self.inv_factors) * self.inv_freq  # [B, T, head_dim / 2]
        return torch.cat((freqs, freqs), dim=-1).transpose(0, 1).unsqueeze(2)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        emb = self.angles(position_ids)
        if self.fused:
            return emb.contiguous()
        return torch.stack((emb.cos(), emb.sin()))


def apply_rope_fp32(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [S, B, heads, d] by cos_sin [2, S, B or 1, 1, d] in fp32; returns x's dtype."""
    cos, sin = cos_sin[0], cos_sin[1]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def longrope_softmax_scale(head_dim: int, rope: RopeConfig) -> float:
    """1/sqrt(head_dim) times the LongRoPE attention factor squared."""
    return rope_scaling_factor(rope) ** 2 / math.sqrt(head_dim)
