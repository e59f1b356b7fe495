"""The MiniCPM-4 transformer layer as a megatron-core `ModuleSpec`.

pre-norm RMSNorm (variance in fp32) -> SelfAttention (fused QKV, GQA, no bias, LongRoPE on q/k in
fp32) -> residual add;
RMSNorm -> SwiGLU MLP (`gated_linear_unit=True`, silu, no bias) -> residual add. With μP each residual
branch is scaled by `scale_depth / sqrt(num_layers)` through `ScaledBiasDropoutAdd`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from voxcpm_train.model.rope import apply_rope_fp32


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim with the variance in fp32: `(x / rms(x)).to(x.dtype) * weight`.

    Signature matches megatron's norm builders (`config`, `hidden_size`, `eps`).
    """

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **_unused):
        super().__init__()
        dtype = config.params_dtype if config is not None else torch.float32
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        setattr(self.weight, "sequence_parallel", bool(config is not None and config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class LongRoPESelfAttention(SelfAttention):
    """megatron `SelfAttention` that applies our LongRoPE (`rotary_pos_emb` = cos_sin [2, S, B, 1, d]
    from `rope.LongRoPE`) to q and k in fp32 right after the QKV projection; megatron's own RoPE
    path is not used (it rotates in the activation dtype)."""

    _cos_sin = None

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None, rotary_pos_emb=None, **kwargs):
        self._cos_sin = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context, rotary_pos_emb=None, **kwargs)
        finally:
            self._cos_sin = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        if self._cos_sin is None:
            return qkv
        query, key, *rest = qkv
        return (apply_rope_fp32(query, self._cos_sin), apply_rope_fp32(key, self._cos_sin), *rest)


class ScaledBiasDropoutAdd:
    """Bias-dropout-add whose branch is scaled: `residual + scale · dropout(x + bias)` (μP depth scaling)."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, training: bool, fused: bool):
        scale = self.scale

        def bias_dropout_add(x_with_bias, residual, prob: float):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return residual + F.dropout(x, p=prob, training=training) * scale

        return bias_dropout_add


def minicpm_layer_spec(core_attention: type, causal: bool, residual_scale: float = 1.0) -> ModuleSpec:
    """Spec of one MiniCPM-4 layer; `core_attention` comes from `attention.core_attention_class`."""
    bda = get_bias_dropout_add if residual_scale == 1.0 else ModuleSpec(module=ScaledBiasDropoutAdd, params={"scale": residual_scale})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=LongRoPESelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=bda,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=bda,
        ),
    )
