"""Core attention modules selected through the layer spec (`core_attention=`).

All take megatron's core-attention call in one of two layouts:

- packed (`packed_seq_params` = `packed_seq.VoxPackedSeqParams`, qkv_format `thd`): query [t, np, hn],
  key/value [t, ng, hn] (megatron squeezes the batch dim of the [t, 1, ...] THD layout), attention within
  each sequence of `cu_seqlens` only, causal when the module's mask type is causal; returns [t, np·hn].
- batch (`packed_seq_params` None): query [S, B, np, hn], key/value [S, B, ng, hn], `attention_mask` bool
  [B or 1, 1, S, S] with True = blocked (megatron's convention) or None; returns [S, B, np·hn]. With no mask
  the module's `attn_mask_type` (causal | no_mask) rules (LocEnc/LocDiT, the sampler).

GQA: ng divides np.

- `SDPAttention`: torch `scaled_dot_product_attention`, any device; the CPU default.
- `te_attention_class()`: Transformer Engine's attention (CUDA), imported lazily.
- `NPUFusionAttention`: `torch_npu.npu_fusion_attention` (Ascend, TND layout for packed rows), imported lazily.
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

from voxcpm_train.config.model import ATTENTION_BACKENDS, ConfigError  # "auto" + the backends below
from voxcpm_train.model.packed_seq import sdpa_chunk_plan

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


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


def packed_sdpa(query, key, value, params, causal: bool, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA over the sequences of `params` (THD): query [t, np, hn], key/value [t, ng, hn] -> [t, np·hn].

    The sequences are grouped into G chunks of at most C = max_seqlen tokens (`packed_seq.sdpa_chunk_plan`)
    and attended in one call on [G, heads, C, hn] with a block-diagonal (causal) bool mask [G, 1, C, C] made
    here; chunks holding a single sequence under a causal mask need no mask at all (their empty tail slots
    only ever see themselves and are dropped)."""
    t = query.shape[0]
    plan = sdpa_chunk_plan(params, query.device)

    def to_chunks(x):  # [t, h, hn] -> [G, h, C, hn]; empty slots read an appended zero row
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
        return x[plan.gather].permute(0, 2, 1, 3)

    q, k, v = to_chunks(query), to_chunks(key), to_chunks(value)
    kwargs = dict(dropout_p=dropout_p, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if causal and plan.one_per_chunk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    else:
        seq = plan.sequence
        allowed = seq.unsqueeze(2) == seq.unsqueeze(1)  # [G, C, C]; empty slots attend to each other
        if causal:
            allowed = allowed & torch.ones(plan.capacity, plan.capacity, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), **kwargs)
    heads, hn = out.shape[1], out.shape[-1]
    out = out.transpose(1, 2).reshape(plan.chunks * plan.capacity, heads, hn)  # slot-major
    return out[plan.scatter].reshape(t, heads * hn)


class SDPAttention(_CoreAttentionBase):
    """Scaled dot-product attention via `torch.nn.functional.scaled_dot_product_attention`."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention takes no attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd" or attention_mask is not None:
                raise ValueError("SDPAttention takes packed rows as thd packed_seq_params without an attention_mask")
            return packed_sdpa(query, key, value, packed_seq_params, mask_type in _CAUSAL, self.softmax_scale, dropout)
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, heads, S, hn]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=mask_type in _CAUSAL, dropout_p=dropout,
                scale=self.softmax_scale, enable_gqa=self.num_groups != self.num_heads,
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout,
                scale=self.softmax_scale, enable_gqa=self.num_groups != self.num_heads,
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


class NPUFusionAttention(_CoreAttentionBase):
    """Ascend `torch_npu.npu_fusion_attention`: packed rows in the TND layout with `actual_seq_qlen/kvlen`
    (cumulative ends of the sequences) and the compressed causal mask (`sparse_mode=3`, a 2048x2048 upper
    triangle, as torch_npu requires); batches in BNSD with an explicit bool mask (True = blocked)."""

    _causal_tnd_mask = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        import torch_npu  # lazy: only on Ascend

        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        keep_prob = 1.0 - (self.dropout if self.training else 0.0)
        if packed_seq_params is not None:
            ends = list(packed_seq_params.cu_seqlens_host[1:])
            causal = mask_type in _CAUSAL
            if causal and (self._causal_tnd_mask is None or self._causal_tnd_mask.device != query.device):
                self._causal_tnd_mask = torch.ones(2048, 2048, dtype=torch.bool, device=query.device).triu(1)
            out = torch_npu.npu_fusion_attention(
                query.contiguous(), key.contiguous(), value.contiguous(), self.num_heads, input_layout="TND",
                atten_mask=self._causal_tnd_mask if causal else None, sparse_mode=3 if causal else 0,
                actual_seq_qlen=ends, actual_seq_kvlen=ends, scale=self.softmax_scale, keep_prob=keep_prob,
            )[0]
            return out.reshape(out.shape[0], -1)
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3).contiguous() for x in (query, key, value))
        if attention_mask is None and mask_type == AttnMaskType.causal:
            attention_mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)[None, None]
        out = torch_npu.npu_fusion_attention(
            q, k, v, self.num_heads, input_layout="BNSD", atten_mask=attention_mask,
            scale=self.softmax_scale, keep_prob=keep_prob,
        )[0]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def te_attention_class():
    """Transformer Engine's core attention (CUDA only): packed rows through megatron's THD path
    (`packed_seq_params`, causal -> TE `padding_causal`, flash/fused kernels); a dense bool mask (the
    `dense_mask` reference path) as a TE `arbitrary` mask."""
    from megatron.core.extensions import transformer_engine as te_ext

    if not te_ext.HAVE_TE:
        raise ConfigError("model.attention_backend=te: Transformer Engine is not installed "
                          "(pip install 'voxcpm-train[te]', CUDA only)")

    class TEAttention(te_ext.TEDotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
            if attention_mask is not None:
                attn_mask_type = AttnMaskType.arbitrary
            return super().forward(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            )

    return TEAttention


def platform_kind() -> str:
    """cuda | npu | cpu: the set-up platform, else what torch sees."""
    try:
        from voxcpm_train.platform import current_platform

        return current_platform().kind
    except (ImportError, RuntimeError):
        return "cuda" if torch.cuda.is_available() else "cpu"


def transformer_engine_available() -> bool:
    """Transformer Engine imports (megatron's extension found it) on a CUDA platform."""
    import importlib.util

    if platform_kind() != "cuda" or importlib.util.find_spec("transformer_engine") is None:
        return False
    from megatron.core.extensions import transformer_engine as te_ext

    return bool(te_ext.HAVE_TE)


def resolve_attention_backend(name: str) -> str:
    """`auto` -> te on CUDA with Transformer Engine installed, npu on Ascend, else sdpa."""
    if name != "auto":
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend={name!r} is not one of {ATTENTION_BACKENDS}")
        return name
    kind = platform_kind()
    if kind == "cuda":
        return "te" if transformer_engine_available() else "sdpa"
    return "npu" if kind == "npu" else "sdpa"


def core_attention_class(name: str):
    """The core-attention module class for backend `name` (auto | sdpa | te | npu)."""
    backend = resolve_attention_backend(name)
    if backend == "te":
        return te_attention_class()
    if backend == "npu":
        return NPUFusionAttention
    return SDPAttention
