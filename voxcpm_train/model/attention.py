"""Core attention modules selected through the layer spec (`core_attention=`).

All take megatron's core-attention call: query [S, B, np, hn], key/value [S, B, ng, hn] (GQA: ng
divides np), `attention_mask` bool [B or 1, 1, S, S] with True = blocked (megatron's convention) or
None, and return [S, B, np·hn]. With no mask the module's `attn_mask_type` (causal | no_mask) rules.

- `SDPAttention`: torch `scaled_dot_product_attention`, any device; the CPU default.
- `te_attention_class()`: Transformer Engine's attention (CUDA), imported lazily.
- `NPUFusionAttention`: `torch_npu.npu_fusion_attention` (Ascend), imported lazily.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from voxcpm_train.config.model import ATTENTION_BACKENDS  # "auto" + the backends below


class _CoreAttentionBase(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by the VoxCPM core attention")
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = config.num_query_groups // tp
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout


class SDPAttention(_CoreAttentionBase):
    """Scaled dot-product attention via `torch.nn.functional.scaled_dot_product_attention`."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes packing through attention_mask (segment ids), not packed_seq_params")
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, heads, S, hn]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=mask_type == AttnMaskType.causal, dropout_p=self.dropout if self.training else 0.0,
                scale=self.softmax_scale, enable_gqa=self.num_groups != self.num_heads,
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=self.dropout if self.training else 0.0,
                scale=self.softmax_scale, enable_gqa=self.num_groups != self.num_heads,
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


class NPUFusionAttention(_CoreAttentionBase):
    """Ascend `torch_npu.npu_fusion_attention` (BNSD layout, explicit bool mask, True = blocked)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        import torch_npu  # lazy: only on Ascend

        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3).contiguous() for x in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None and mask_type == AttnMaskType.causal:
            attention_mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)[None, None]
        out = torch_npu.npu_fusion_attention(
            q, k, v, self.num_heads, input_layout="BNSD", atten_mask=attention_mask,
            scale=self.softmax_scale, keep_prob=1.0 - (self.dropout if self.training else 0.0),
        )[0]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def te_attention_class():
    """Transformer Engine's core attention taking our bool masks as TE `arbitrary` masks (CUDA only)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TEAttention(TEDotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
            if attention_mask is not None:
                attn_mask_type = AttnMaskType.arbitrary
            return super().forward(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            )

    return TEAttention


def resolve_attention_backend(name: str) -> str:
    """`auto` -> te on CUDA with Transformer Engine installed, npu on Ascend, else sdpa."""
    if name != "auto":
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend={name!r} is not one of {ATTENTION_BACKENDS}")
        return name
    try:
        from voxcpm_train.platform import current_platform

        kind = current_platform().kind
    except (ImportError, RuntimeError):
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        import importlib.util

        return "te" if importlib.util.find_spec("transformer_engine") is not None else "sdpa"
    return "npu" if kind == "npu" else "sdpa"


def core_attention_class(name: str):
    """The core-attention module class for backend `name` (auto | sdpa | te | npu)."""
    backend = resolve_attention_backend(name)
    if backend == "te":
        return te_attention_class()
    if backend == "npu":
        return NPUFusionAttention
    return SDPAttention
