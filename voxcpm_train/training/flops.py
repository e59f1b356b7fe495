"""Model FLOPs of VoxCPM training (for MFU): the matmuls the model runs, counted per micro-batch.

Conventions (those of MFU in Megatron-LM / PaLM): a matmul of [n, k] x [k, m] is 2·n·k·m FLOPs; training
is 3x the forward (backward = 2x); elementwise ops, norms, softmax and the embedding lookup are not
counted; attention is QK^T + AV, 4·L_q·L_k·(heads·head_dim) per layer, and *causal* attention counts the
lower triangle only (half of 4·L²·q: the work a causal kernel has to do). Attention spans are the packed
samples, not the rows (a row of T positions holding samples of lengths L_i costs Σ L_i², not T²).

What runs where (as `VoxCPMModel` does it): TSLM, FSQ, `fusion_concat_proj` and RALM at every position;
LocEnc (P+1 tokens: CLS + P frames, bidirectional) and `enc_to_lm_proj` at audio positions only; the two
`*_to_dit_proj`, the LocDiT (C + 1 + 2P tokens: C condition tokens, the time token, P cond frames, P x_t
frames; C = 2 for voxcpm2, the v1 time token is added to its single mu) and the stop head at loss
positions only. `forward_flops` equals torch's `FlopCounterMode` count of our forward exactly for the
matmuls and for bidirectional attention, and half of it for causal attention (torch counts the full
square; tests/test_training_flops.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch


def _head_dim(stack) -> int:
    return stack.kv_channels or stack.hidden_size // stack.num_attention_heads


def _layer_matmul_params(stack) -> int:
    """Weights a token meets in one layer: fused QKV, output projection, gate/up and down."""
    hd = _head_dim(stack)
    q, kv, h = stack.num_attention_heads * hd, stack.num_query_groups * hd, stack.hidden_size
    return h * (q + 2 * kv) + q * h + 3 * h * stack.ffn_hidden_size


def _attention_pair_flops(stack) -> int:
    """Forward FLOPs of one (query, key) pair in one layer: 2 matmuls x 2 x q width."""
    return 4 * stack.num_attention_heads * _head_dim(stack)


@dataclass(frozen=True)
class BatchShape:
    """What one micro-batch makes the model do.

    positions: tokens through TSLM/RALM; audio_positions: through the LocEnc; loss_positions: through the
    LocDiT and the stop head; sequence_lengths: the causal attention spans of TSLM/RALM (one per packed
    sample; they sum to `positions`)."""

    positions: int
    audio_positions: int
    loss_positions: int
    sequence_lengths: Tuple[int, ...]

    @classmethod
    def of_batch(cls, batch: Dict[str, torch.Tensor], include_padding: bool = False) -> "BatchShape":
        """From a micro-batch dict (docs/architecture.md). Without padding: the useful work (MFU); with it:
        what the model executes (padding runs are sequences of their own in the THD layout)."""
        from voxcpm_train.model.packed_seq import segment_boundaries

        B, T = batch["text_mask"].shape
        seg = batch.get("segment_ids")
        cu = segment_boundaries(seg, B, T)
        lengths = [int(n) for n in (cu[1:] - cu[:-1])]
        if seg is not None and not include_padding:
            is_pad = seg.reshape(-1)[torch.as_tensor(cu[:-1])] == 0
            lengths = [n for n, pad in zip(lengths, is_pad.tolist()) if not pad]
        return cls(positions=sum(lengths), audio_positions=int(batch["audio_mask"].sum()),
                   loss_positions=int((batch["loss_mask"] > 0).sum()), sequence_lengths=tuple(lengths))


def forward_flops(mc, shape: BatchShape) -> Dict[str, int]:
    """Forward FLOPs by part (`lm`, `lm_attention`, `encoder`, `encoder_attention`, `dit`, `dit_attention`,
    `projections`) and `total`, for model config `mc` on a micro-batch of `shape`."""
    P, D, H = mc.patch_size, mc.feat_dim, mc.lm.hidden_size
    e, d = mc.encoder.hidden_size, mc.dit.hidden_size
    lm_layers = mc.lm.num_layers + mc.residual_lm_num_layers
    causal_pairs = sum(n * n for n in shape.sequence_lengths) // 2
    enc_tokens = P + 1
    cond_tokens = 2 if mc.architecture == "voxcpm2" else 1
    time_tokens = 1 if mc.architecture == "voxcpm2" else 0
    dit_tokens = cond_tokens + time_tokens + 2 * P
    fusion = 2 * H * H if mc.architecture == "voxcpm2" else 0
    parts = {
        "lm": 2 * shape.positions * lm_layers * _layer_matmul_params(mc.lm),
        "lm_attention": lm_layers * _attention_pair_flops(mc.lm) * causal_pairs,
        "encoder": 2 * shape.audio_positions * enc_tokens * mc.encoder.num_layers * _layer_matmul_params(mc.encoder),
        "encoder_attention": shape.audio_positions * mc.encoder.num_layers * _attention_pair_flops(mc.encoder)
        * enc_tokens ** 2,
        "dit": 2 * shape.loss_positions * dit_tokens * mc.dit.num_layers * _layer_matmul_params(mc.dit),
        "dit_attention": shape.loss_positions * mc.dit.num_layers * _attention_pair_flops(mc.dit) * dit_tokens ** 2,
        "projections": 2 * (
            shape.audio_positions * (P * D * e + e * H)                                    # in_proj, enc_to_lm
            + shape.positions * (2 * H * mc.fsq_latent_dim + fusion)                       # FSQ in/out, fusion
            + shape.loss_positions * (2 * H * d + 2 * P * D * d + 4 * d * d + P * d * D    # to_dit, in/cond,
                                      + H * H + 2 * H)                                    # time MLPs, out; stop
        ),
    }
    parts["total"] = sum(parts.values())
    return parts


def training_flops(mc, shape: BatchShape) -> int:
    """Model FLOPs of one training forward + backward on a micro-batch of `shape` (3x the forward)."""
    return 3 * forward_flops(mc, shape)["total"]


def flops_per_position(mc, seq_len: int, audio_fraction: float = 1.0, loss_fraction: float = 1.0,
                       sequence_length: Optional[int] = None) -> float:
    """Training FLOPs per position of rows of `seq_len` positions, an estimate for logging without the
    batch: a fraction of the positions through the LocEnc / LocDiT (1.0: all, an upper bound) and packed
    samples of `sequence_length` positions (default: one per row, also an upper bound)."""
    n = sequence_length or seq_len
    lengths: Sequence[int] = (n,) * max(1, seq_len // n)
    positions = sum(lengths)
    shape = BatchShape(positions=positions, audio_positions=round(audio_fraction * positions),
                       loss_positions=round(loss_fraction * positions), sequence_lengths=tuple(lengths))
    return training_flops(mc, shape) / positions


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
