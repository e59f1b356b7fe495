"""Model FLOPs per trained position (for the MFU estimate): 6 x matmul parameters touched + attention."""
from __future__ import annotations

import torch


def _layer_matmul_params(stack) -> int:
    hd = stack.kv_channels or stack.hidden_size // stack.num_attention_heads
    q = stack.num_attention_heads * hd
    kv = stack.num_query_groups * hd
    h = stack.hidden_size
    return h * q + 2 * h * kv + q * h + 3 * h * stack.ffn_hidden_size


def _attn_flops(stack, n_layers: int, ctx: float) -> float:
    # QK^T and AV: 2 matmuls x 2 flops x q width x context, times 3 for forward + backward
    hd = stack.kv_channels or stack.hidden_size // stack.num_attention_heads
    return 3 * 2 * 2 * n_layers * stack.num_attention_heads * hd * ctx


def flops_per_position(mc, seq_len: int) -> float:
    """Training FLOPs (fwd+bwd) per sequence position of a VoxCPM2 model config `mc`."""
    P, H = mc.patch_size, mc.lm.hidden_size
    lm_layers = mc.lm.num_layers + mc.residual_lm_num_layers
    per_layer = _layer_matmul_params(mc.lm)
    f = 6.0 * lm_layers * per_layer + _attn_flops(mc.lm, lm_layers, seq_len / 2)  # causal: half context
    enc_tokens = P + 1
    f += 6.0 * enc_tokens * mc.encoder.num_layers * _layer_matmul_params(mc.encoder)
    f += _attn_flops(mc.encoder, mc.encoder.num_layers, enc_tokens) * enc_tokens
    dit_tokens = 3 + 2 * P
    f += 6.0 * dit_tokens * mc.dit.num_layers * _layer_matmul_params(mc.dit)
    f += _attn_flops(mc.dit, mc.dit.num_layers, dit_tokens) * dit_tokens
    # projections: enc_in, enc_to_lm, fsq in/out, fusion, 2 x to_dit, stop, dit in/out
    e, d = mc.encoder.hidden_size, mc.dit.hidden_size
    proj = (mc.feat_dim * e * enc_tokens + e * H + 2 * H * mc.fsq_latent_dim + 2 * H * H
            + 2 * H * d + H * H + 2 * H + 2 * mc.feat_dim * d * P)
    f += 6.0 * proj
    return f


def peak_flops_per_device(configured: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of this process's device (configured value in TFLOP/s wins)."""
    if configured:
        return configured * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for key, tf in (("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("h800", 989.0), ("l40", 181.0)):
            if key in name:
                return tf * 1e12
        return None
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return 320e12 if "910b" in str(npu.get_device_name()).lower() else 256e12
    return None
