"""LocEnc (`feat_encoder`): one latent patch -> one LM-input vector, per position."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from voxcpm_train.model.rope import LongRoPE
from voxcpm_train.model.transformer import StackBlock


class LocalEncoder(MegatronModule):
    """`in_proj` (D -> H_enc) on the P frames, a learned CLS `special_token` prepended, a bidirectional
    `encoder` stack over the P+1 tokens (batch = the B·T positions), output = the CLS token.

    `forward(feats [B, T, P, D]) -> [B, T, H_enc]`. No mask, no packing: every position is its own
    short sequence (the batch dim), the fast path of every attention backend. `impl`: the layer spec.
    """

    def __init__(self, block_config, core_attention, rope_config, feat_dim: int, residual_scale: float, impl: str = "local"):
        super().__init__(config=block_config)
        hidden = block_config.hidden_size
        dtype = block_config.params_dtype
        self.in_proj = torch.nn.Linear(feat_dim, hidden, dtype=dtype)
        self.special_token = torch.nn.Parameter(torch.randn(1, 1, 1, hidden, dtype=dtype))
        self.encoder = StackBlock(
            block_config, core_attention, causal=False, residual_scale=residual_scale,
            first_layer=0, num_layers=block_config.num_layers, total_layers=block_config.num_layers, final_norm=True,
            impl=impl,
        )
        self.rope = LongRoPE(block_config.kv_channels, rope_config, fused=impl == "te")

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        batch, seq, patch, _ = feats.shape
        x = self.in_proj(feats)
        cls = self.special_token.expand(batch, seq, 1, -1)
        x = torch.cat([cls, x], dim=2).reshape(batch * seq, patch + 1, -1).transpose(0, 1)  # [P+1, N, H]
        positions = torch.arange(patch + 1, device=feats.device).unsqueeze(0)
        out = self.encoder(x.contiguous(), attention_mask=None, rotary_pos_emb=self.rope(positions))
        return out[0].reshape(batch, seq, -1)
