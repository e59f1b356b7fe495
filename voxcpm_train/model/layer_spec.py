"""The MiniCPM-4 transformer layer as a megatron-core `ModuleSpec`, in two implementations.

pre-norm RMSNorm (variance in fp32) -> SelfAttention (fused QKV, GQA, no bias, LongRoPE on q/k in
fp32) -> residual add;
RMSNorm -> SwiGLU MLP (`gated_linear_unit=True`, silu, no bias) -> residual add. With μP each residual
branch is scaled by `scale_depth / sqrt(num_layers)` through `ScaledBiasDropoutAdd`.

- `local` (`minicpm_layer_spec(..., impl="local")`): megatron's `ColumnParallelLinear`/`RowParallelLinear`,
  our `RMSNorm`, LongRoPE applied in fp32 by `apply_rope_fp32`. Runs anywhere (the CPU path).
- `te`: Transformer Engine through megatron's wrappers, as megatron's own TE GPT spec does: the RMSNorms
  fused into the QKV and fc1 GEMMs (`TELayerNormColumnParallelLinear`, `input_layernorm` /
  `pre_mlp_layernorm` are `IdentityOp`), `TERowParallelLinear` for linear_proj/fc2, LongRoPE
  through TE's fused RoPE kernel with our fp32 per-dimension angles (`LongRoPE(fused=True)`). The submodule
  names (linear_qkv, linear_proj, linear_fc1, linear_fc2) are the local ones; the fused norm weights are
  mapped back to the local names both in `sharded_state_dict` (megatron's `sharded_state_dict_keys_map`)
  and in the plain `state_dict` (`MiniCPMTELayer`), so checkpoints and the convert table are shared.
  Core attention is `model.attention_backend`'s in both (TE's under auto on CUDA). Built lazily:
  nothing imports Transformer Engine until a te spec is asked for (`te_modules()`). Note for adapters
  (LoRA) on linear_qkv / linear_fc1: under te those modules normalise their input themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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

from voxcpm_train.config.model import ConfigError
from voxcpm_train.model.rope import apply_rope_fp32

# TE's fused-norm weight names -> the local spec's names (checkpoints and the convert table use the latter).
TE_TO_LOCAL_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


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
    """megatron `SelfAttention` that applies our LongRoPE to q and k right after the QKV projection (q/k
    [S, B, heads, d], before megatron squeezes the THD batch dim); megatron's own unfused RoPE path is not
    used (it rotates in the activation dtype). `rope_fusion=False`: `rotary_pos_emb` = cos_sin
    [2, S, B, 1, d], rotated by `apply_rope_fp32`; `rope_fusion=True` (te spec): `rotary_pos_emb` = fp32
    angles [S, 1, 1, d] for Transformer Engine's fused RoPE kernel (fp32 math inside)."""

    _cos_sin = None

    def __init__(self, *args, rope_fusion: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._rotate = te_modules().fused_rope if rope_fusion else apply_rope_fp32

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
        return (self._rotate(query, self._cos_sin), self._rotate(key, self._cos_sin), *rest)


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


@dataclass(frozen=True)
class TEModules:
    """The Transformer Engine pieces of the te spec: megatron's linear wrappers and TE's fused RoPE
    `fused_rope(t [S, B, h, d], freqs [S, 1, 1, d] fp32) -> t` (core attention is chosen separately,
    `model.attention_backend`)."""

    layernorm_column_linear: type
    row_linear: type
    fused_rope: Callable


def te_modules() -> TEModules:
    """megatron's TE wrappers (`megatron.core.extensions.transformer_engine`); ConfigError without TE."""
    from voxcpm_train.model.attention import transformer_engine_available

    if not transformer_engine_available():
        raise ConfigError("model.transformer_impl=te needs Transformer Engine on a CUDA device "
                          "(pip install 'voxcpm-train[te]'); it is not available here")
    from megatron.core.extensions import transformer_engine as te_ext

    return TEModules(te_ext.TELayerNormColumnParallelLinear, te_ext.TERowParallelLinear, te_ext.fused_apply_rotary_pos_emb)


def resolve_transformer_impl(name: str) -> str:
    """`auto` -> te on CUDA with Transformer Engine installed, else local."""
    from voxcpm_train.model.attention import transformer_engine_available

    if name == "auto":
        return "te" if transformer_engine_available() else "local"
    if name not in ("local", "te"):
        raise ConfigError(f"model.transformer_impl={name!r} is not one of auto, local, te")
    return name


def check_fp8_available(fp8) -> None:
    """ConfigError unless FP8 GEMMs can run here (Transformer Engine, CUDA compute capability >= 8.9)."""
    if fp8 is None:
        return
    from voxcpm_train.model.attention import transformer_engine_available

    if not transformer_engine_available():
        raise ConfigError(f"model.fp8={fp8!r} needs Transformer Engine on a CUDA device; it is not available here")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"model.fp8={fp8!r} needs a GPU of compute capability >= 8.9 (Ada/Hopper); "
                          f"{torch.cuda.get_device_name()} has {major}.{minor}")


class MiniCPMTELayer(TransformerLayer):
    """megatron `TransformerLayer` whose plain `state_dict` uses the local spec's names for the norm
    weights TE fuses into linear_qkv / linear_fc1 (`TE_TO_LOCAL_KEYS`), in both directions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_state_dict_hook(_te_to_local_state_dict)
        self._register_load_state_dict_pre_hook(_local_to_te_state_dict)


def _te_to_local_state_dict(module, state_dict, prefix, local_metadata):
    for te_key, local_key in TE_TO_LOCAL_KEYS.items():
        if prefix + te_key in state_dict:
            state_dict[prefix + local_key] = state_dict.pop(prefix + te_key)
    return state_dict


def _local_to_te_state_dict(state_dict, prefix, *args):
    for te_key, local_key in TE_TO_LOCAL_KEYS.items():
        if prefix + local_key in state_dict:
            state_dict[prefix + te_key] = state_dict.pop(prefix + local_key)


def minicpm_layer_spec(core_attention: type, causal: bool, residual_scale: float = 1.0, impl: str = "local") -> ModuleSpec:
    """Spec of one MiniCPM-4 layer (`impl` local | te, see the module docstring); `core_attention` comes
    from `attention.core_attention_class`."""
    bda = get_bias_dropout_add if residual_scale == 1.0 else ModuleSpec(module=ScaledBiasDropoutAdd, params={"scale": residual_scale})
    mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if impl == "te":
        te = te_modules()
        return ModuleSpec(
            module=MiniCPMTELayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=IdentityOp,
                self_attention=ModuleSpec(
                    module=LongRoPESelfAttention,
                    params={"attn_mask_type": mask_type, "rope_fusion": True},
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=te.layernorm_column_linear,
                        core_attention=core_attention,
                        linear_proj=te.row_linear,
                        q_layernorm=IdentityOp,
                        k_layernorm=IdentityOp,
                    ),
                ),
                self_attn_bda=bda,
                pre_mlp_layernorm=IdentityOp,
                mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=te.layernorm_column_linear, linear_fc2=te.row_linear)),
                mlp_bda=bda,
                sharded_state_dict_keys_map={
                    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
                },
            ),
        )
    if impl != "local":
        raise ValueError(f"layer impl {impl!r} is not local or te")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=LongRoPESelfAttention,
                params={"attn_mask_type": mask_type},
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
