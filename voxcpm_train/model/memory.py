"""Training memory of one device, estimated from the model shape (`voxcpm-model info --memory`).

Terms (bytes; P = parameters, T = trainable parameters, N = positions per micro-batch):

* weights            `w_bytes · P` (bf16: 2, fp32: 4), frozen or not
* gradient buffers   `4 · T` (megatron DDP reduces bf16 grads in an fp32 buffer; 4 in fp32 too)
* optimizer          `12 · T` fp32 main params + Adam m, v (bf16; 8 · T in fp32: no main copy), on the
                     device, or `(1 - offload_fraction)` of it with `optim.cpu_offload` (the rest in
                     host memory); divided by DP with the distributed optimizer
* activations        what autograd saves for backward, per stack: tokens x layers x bytes per token
                     and layer (`layer_activation_bytes`, counted tensor by tensor for our local layer
                     spec and SDPA-style attention (no S x S scores), checked against the tensors torch
                     actually saves in tests/test_lora_memory.py); tokens: TSLM/RALM N, LocEnc
                     `audio_fraction · N · (P+1)`, LocDiT `loss_fraction · N · (2 + 1 + 2P)` (voxcpm2).
                     `parallel.recompute=full` (TSLM/RALM) and `parallel.recompute_local=full`
                     (LocEnc/LocDiT): a recomputed layer keeps only its input (`e · h` per token), plus
                     the largest recomputed layer's working set during its backward (one at a time);
                     `selective` (core attention) saves nothing with SDPA-style attention (no S x S
                     scores) and counts as none. Plus `OTHER_PER_POSITION · e · H` per position outside
                     the stacks (embeddings, FSQ, fusion, projections, losses; measured).
* workspace          a fixed allowance for the CUDA context, cuBLAS/attention workspaces and the
                     allocator's fragmentation: `WORKSPACE_BYTES + WORKSPACE_SHARE · (the rest)`

One device: PP = 1; TP = 1 (what a consumer GPU runs) or one rank of a TP group (`tp`, with or without
sequence parallelism: TP-split weights 1/tp, activations as `layer_activation_bytes` says). Assumptions
are deliberately conservative: every position of a micro-batch is counted as audio and as a loss
position unless told otherwise; `parallel.recompute=selective` with SDPA-style attention counts as none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from voxcpm_train.config.model import ModelConfig
from voxcpm_train.config.peft import PeftConfig

GIB = 1024 ** 3
WORKSPACE_BYTES = int(1.0 * GIB)   # CUDA context + library workspaces (typical: 0.5-1 GiB)
WORKSPACE_SHARE = 0.10             # allocator fragmentation / temporaries of the backward pass
# activations outside the stacks per position, in units of e·H (measured on our model, test_lora_memory.py):
# with the projections/FSQ/embedding training, and with all of them frozen (LoRA on the stacks only)
OTHER_PER_POSITION = 11
OTHER_PER_POSITION_FROZEN = 2


@dataclass
class StackShape:
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    layers: int


def _stack_shapes(cfg: ModelConfig) -> dict:
    def shape(stack, layers):
        return StackShape(stack.hidden_size, stack.ffn_hidden_size, stack.num_attention_heads,
                          stack.num_query_groups, stack.head_dim, layers)

    return {
        "base_lm": shape(cfg.lm, cfg.lm.num_layers),
        "residual_lm": shape(cfg.lm, cfg.residual_lm_num_layers),
        "feat_encoder": shape(cfg.encoder, cfg.encoder.num_layers),
        "feat_decoder": shape(cfg.dit, cfg.dit.num_layers),
    }


def layer_activation_bytes(s: StackShape, elem: int, train_weights: bool, adapters: Sequence[str] = (),
                           rank: int = 0, rope: bool = True, mask_keys: int = 0, tp: int = 1,
                           sequence_parallel: bool = False) -> float:
    """Bytes autograd saves per token in one MiniCPM-4 layer on one TP rank (our local spec, SDPA-style
    attention); a token of the whole sequence, so a sequence-parallel term counts 1/tp of its bytes.

    Two RMSNorms: input (e·h), rsqrt (4), the fp32 copy of the input when e < 4 (4h), and with a
    trainable norm weight the normalized tensor (e·h). Attention: the fused QKV output e(q+2kv) (k, v
    are views of it), q (e·q), the rotated k with RoPE (e·kv), the log-sum-exp (4 per head), the output
    (e·q, also the input of linear_proj), and with a segment mask of `mask_keys` keys the additive mask
    SDPA makes of it in every layer (e·mask_keys). MLP: fc1 output [gate; up] (2e·f) and the SwiGLU
    intermediates (2e·f). Inputs of linear_qkv (e·h), linear_fc1 (e·h) and linear_fc2 (e·f) are kept
    only when the weight trains or the linear has an adapter (megatron's frozen-weight linear saves no
    input); an adapter adds its rank-r intermediate (e·r). q = heads·head_dim, kv = groups·head_dim.
    Under TP the heads and the ffn are split (attention, MLP, fc2 input: 1/tp); the norms and the
    qkv/fc1 inputs (the hidden stream) are whole, or 1/tp with `sequence_parallel` (megatron keeps the
    sequence shard and gathers it again in the backward); the mask and the adapters' intermediates
    count whole (upper bound).
    """
    h, f = s.hidden, s.ffn
    q, kv = s.heads * s.head_dim, s.groups * s.head_dim
    sp = tp if sequence_parallel else 1
    attn = (elem * (q + 2 * kv) + elem * q + (elem * kv if rope else 0) + 4 * s.heads + elem * q) / tp + elem * mask_keys
    mlp = 4 * elem * f / tp
    inputs = {"linear_qkv": elem * h / sp, "linear_proj": 0, "linear_fc1": elem * h / sp, "linear_fc2": elem * f / tp}
    kept = sum(v for k, v in inputs.items() if train_weights or k in adapters)
    norms = 2 * norm_activation_bytes(h, elem, train_weights) / sp
    return norms + attn + mlp + kept + elem * rank * len(adapters)


def norm_activation_bytes(h: int, elem: int, train_weight: bool) -> int:
    """Per token, one RMSNorm (variance in fp32): input, rsqrt, fp32 copy, normalized if the weight trains."""
    return 4 + elem * h + (4 * h if elem < 4 else 0) + (elem * h if train_weight else 0)


@dataclass
class MemoryLine:
    name: str
    bytes: int
    note: str = ""
    on_device: bool = True


@dataclass
class MemoryEstimate:
    lines: List[MemoryLine] = field(default_factory=list)
    parameters: int = 0               # the whole model
    trainable: int = 0
    rank_parameters: int = 0          # on one TP rank (= parameters at TP = 1)
    rank_trainable: int = 0

    @property
    def device_bytes(self) -> int:
        return sum(line.bytes for line in self.lines if line.on_device)

    @property
    def host_bytes(self) -> int:
        return sum(line.bytes for line in self.lines if not line.on_device)

    def as_dict(self) -> dict:
        return {
            "parameters": self.parameters, "trainable": self.trainable,
            "rank_parameters": self.rank_parameters, "rank_trainable": self.rank_trainable,
            "device_bytes": self.device_bytes, "host_bytes": self.host_bytes,
            "lines": [dataclasses.asdict(line) for line in self.lines],
        }


def parameter_counts(cfg: ModelConfig, peft: PeftConfig, tp: int = 1) -> tuple:
    """(all, trainable) parameters of the whole model (one stage) with `peft` applied, built on the meta
    device; with `tp` > 1 those of one TP rank: megatron's TP-split tensors (`tensor_model_parallel`, set
    at TP = 1 too) count 1/tp, replicated ones whole. Needs megatron's parallel state (TP = PP = 1)."""
    total, trainable, rank_total, rank_trainable = _counts(cfg, peft, tp)
    return (rank_total, rank_trainable) if tp > 1 else (total, trainable)


_COUNTS: dict = {}   # (repr(cfg), repr(peft), tp) -> counts: a 2B meta build takes seconds


def _counts(cfg: ModelConfig, peft: PeftConfig, tp: int) -> tuple:
    """(all, trainable, all on one TP rank, trainable on one TP rank), from one meta build."""
    key = (repr(cfg), repr(peft), tp)
    if key in _COUNTS:
        return _COUNTS[key]
    import torch

    from voxcpm_train.model.lora import apply_peft
    from voxcpm_train.model.voxcpm import VoxCPMModel

    for name in ("lm", "encoder", "dit"):
        stack = getattr(cfg, name)
        for attr in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(stack, attr) % tp:
                raise ValueError(f"tensor parallel size {tp} does not divide model.{name}.{attr}={getattr(stack, attr)}")
    if cfg.vocab_size % tp:   # megatron would pad the vocabulary; the estimate counts the exact split
        raise ValueError(f"tensor parallel size {tp} does not divide model.vocab_size={cfg.vocab_size}")
    with torch.device("meta"):
        model = VoxCPMModel(cfg, pre_process=True, post_process=True, pp_rank=0, pp_size=1)
        apply_peft(model, peft)
    params = list(model.parameters())
    local = lambda p: p.numel() // tp if getattr(p, "tensor_model_parallel", False) else p.numel()
    _COUNTS[key] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                    sum(local(p) for p in params), sum(local(p) for p in params if p.requires_grad))
    return _COUNTS[key]


# the model's modules in forward order: a frozen stack stores nothing when no gradient has to flow
# through it (nothing trainable at or before it)
_FORWARD_ORDER = ("feat_encoder", "base_lm", "residual_lm", "feat_decoder")


def activation_lines(cfg: ModelConfig, peft: PeftConfig, row_tokens: int, micro_batch_size: int = 1, *,
                     elem: int = 2, recompute: str = "none", recompute_local: str = "none",
                     audio_fraction: float = 1.0, loss_fraction: float = 1.0,
                     max_seqlen: Optional[int] = None, tp: int = 1,
                     sequence_parallel: bool = False) -> List[MemoryLine]:
    """Activation bytes per stack of one micro-batch of `micro_batch_size` rows x `row_tokens` positions
    on one TP rank (`MemoryLine`s). Stacks whose weights train or that hold adapters store activations,
    frozen ones only if a gradient flows through them. `recompute`: parallel.recompute (TSLM/RALM),
    `recompute_local`: parallel.recompute_local (LocEnc/LocDiT). `max_seqlen`: the longest packed sample
    (padding runs count); the SDPA THD path masks chunks of that many keys (None: `row_tokens`, the upper
    bound and what the dense mask of `model.packed_seq_format=dense_mask` costs). `tp`,
    `sequence_parallel`: parallel.tp / parallel.sequence_parallel (the TSLM/RALM only; LocEnc and LocDiT
    split their heads and ffn but run on the whole sequence); the activations outside the stacks count
    whole (an upper bound under TP)."""
    shapes = _stack_shapes(cfg)
    lora = peft.lora if peft.uses_lora else None
    positions = row_tokens * micro_batch_size
    p = cfg.patch_size
    dit_tokens = (3 + 2 * p) if cfg.architecture == "voxcpm2" else (1 + 2 * p)
    tokens = {
        "base_lm": positions,
        "residual_lm": positions,
        "feat_encoder": int(round(audio_fraction * positions)) * (p + 1),
        "feat_decoder": int(round(loss_fraction * positions)) * dit_tokens,
    }
    lines, working, grad_flows = [], [], False
    for stack in _FORWARD_ORDER:
        s = shapes[stack]
        trains = not (peft.uses_lora and not peft.lora.train_base) and not any(
            stack == prefix or stack.startswith(prefix + ".") for prefix in peft.freeze)
        adapters = tuple(getattr(lora, stack)) if lora is not None and stack != "feat_encoder" else ()
        grad_flows = grad_flows or trains or bool(adapters)
        n = tokens[stack]
        if not grad_flows:
            lines.append(MemoryLine(f"activations {stack}", 0, "frozen, no gradient flows through it"))
            continue
        rank = lora.group_rank(stack) if adapters else 0
        rope = not (stack == "residual_lm" and cfg.residual_lm_no_rope)
        masked = stack in ("base_lm", "residual_lm")           # causal + segment mask; LocEnc/LocDiT: none
        mask_keys = row_tokens if cfg.packed_seq_format == "dense_mask" else (max_seqlen or row_tokens)
        sp = tp if (sequence_parallel and masked and tp > 1) else 1   # the TSLM/RALM hidden stream's split
        per_layer = layer_activation_bytes(s, elem, trains, adapters, rank, rope, mask_keys if masked else 0,
                                           tp=tp, sequence_parallel=sp > 1)
        final_norm = norm_activation_bytes(s.hidden, elem, trains) / sp
        layer_input = elem * s.hidden / sp
        # sequence parallel: the first TSLM layer's input is this rank's slice (a view) of the embedded
        # sequence, whose whole storage it keeps alive
        unsplit = round(n * elem * s.hidden * (1 - 1 / sp)) if stack == "base_lm" else 0
        extra = f" + unsplit input {unsplit:,} B" if unsplit else ""
        if (recompute if masked else recompute_local) == "full":
            # checkpointed per layer: its input; once (TSLM and RALM share them): the fp32 RoPE cos/sin
            # [2, T, B, 1, d] and, with model.packed_seq_format=dense_mask, the bool segment mask [B, 1, T, T]
            # (the THD layout keeps only the segment boundaries); LocEnc/LocDiT: their RoPE table [2, S, 1, 1, d]
            if masked:
                dense = micro_batch_size * row_tokens ** 2 if cfg.packed_seq_format == "dense_mask" else 0
                shared = dense + 8 * s.head_dim * positions if stack == "base_lm" else 0
            else:
                shared = 8 * s.head_dim * (p + 1 if stack == "feat_encoder" else dit_tokens)
            lines.append(MemoryLine(f"activations {stack}", round(n * (s.layers * layer_input + final_norm)) + shared + unsplit,
                                    f"{n:,} tokens x ({s.layers} layer inputs x {layer_input:,.0f} B + norm "
                                    f"{final_norm:,.0f} B) + {'mask/' if masked else ''}rope {shared:,} B{extra}, recomputed"))
            working.append(MemoryLine("recompute working set", round(n * per_layer),
                                      f"{n:,} tokens x one {stack} layer's {per_layer:,.0f} B, live during its backward"))
        else:
            lines.append(MemoryLine(f"activations {stack}", round(n * (s.layers * per_layer + final_norm)) + unsplit,
                                    f"{n:,} tokens x ({s.layers} layers x {per_layer:,.0f} B + norm {final_norm:,.0f} B){extra}"))
    if working:  # one layer is recomputed at a time: the largest working set
        lines.append(max(working, key=lambda line: line.bytes))
    outside_trains = not (peft.uses_lora and not peft.lora.train_base)
    k = OTHER_PER_POSITION if outside_trains else OTHER_PER_POSITION_FROZEN
    lines.append(MemoryLine("activations other", positions * k * elem * cfg.lm.hidden_size,
                            f"{positions:,} positions x {k} x e·H (embeddings, FSQ, fusion, projections, losses)"))
    return lines


def estimate_training_memory(cfg: ModelConfig, peft: PeftConfig, *, row_tokens: int, micro_batch_size: int = 1,
                             precision: str = "bf16", recompute: str = "none", recompute_local: str = "none",
                             cpu_offload: bool = False,
                             offload_fraction: float = 1.0, audio_fraction: float = 1.0,
                             loss_fraction: float = 1.0, dp: int = 1, distributed_optimizer: bool = True,
                             tp: int = 1, sequence_parallel: bool = False) -> MemoryEstimate:
    """Per-device training memory of `cfg` with `peft` (see the module docstring for every term); `dp`,
    `tp`, `sequence_parallel`: the data/tensor-parallel layout (PP = 1)."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision {precision!r}: bf16 | fp32")
    model_total, model_trainable, total, trainable = _counts(cfg, peft, tp)
    elem = 2 if precision == "bf16" else 4
    est = MemoryEstimate(parameters=model_total, trainable=model_trainable, rank_parameters=total,
                         rank_trainable=trainable)
    of = f" (1 TP rank of {tp})" if tp > 1 else ""
    est.lines.append(MemoryLine("weights", elem * total, f"{total:,} params{of} x {elem} B ({precision})"))
    est.lines.append(MemoryLine("gradient buffers", 4 * trainable, f"{trainable:,} trainable x 4 B (fp32)"))
    opt_per_param = 12 if precision == "bf16" else 8
    shard = dp if distributed_optimizer else 1
    opt = opt_per_param * trainable // shard
    what = ("fp32 main params + Adam m, v" if precision == "bf16" else "Adam m, v") + (f" / DP {dp}" if shard > 1 else "")
    if cpu_offload:
        host = int(opt * offload_fraction)
        est.lines.append(MemoryLine("optimizer (offloaded)", host, f"{what}, x{offload_fraction:g} in host memory", False))
        est.lines.append(MemoryLine("optimizer", opt - host, f"{what}, the rest"))
    else:
        est.lines.append(MemoryLine("optimizer", opt, f"{trainable:,} trainable x {opt_per_param} B ({what})"))
    est.lines += activation_lines(cfg, peft, row_tokens, micro_batch_size, elem=elem, recompute=recompute,
                                  recompute_local=recompute_local, audio_fraction=audio_fraction,
                                  loss_fraction=loss_fraction, tp=tp, sequence_parallel=sequence_parallel)
    rest = est.device_bytes
    est.lines.append(MemoryLine("workspace", WORKSPACE_BYTES + int(WORKSPACE_SHARE * rest),
                                f"{WORKSPACE_BYTES / GIB:.1f} GiB + {WORKSPACE_SHARE:.0%} of the above"))
    return est


def format_estimate(est: MemoryEstimate, budget_gib: Optional[float] = None) -> str:
    width = max(len(line.name) for line in est.lines)
    rows = [f"  {line.name:<{width}}  {line.bytes / GIB:8.2f} GiB  {'(host) ' if not line.on_device else ''}{line.note}"
            for line in est.lines]
    rows.append(f"  {'total on the device':<{width}}  {est.device_bytes / GIB:8.2f} GiB"
                + (f"  (host: {est.host_bytes / GIB:.2f} GiB)" if est.host_bytes else ""))
    if budget_gib is not None:
        fits = est.device_bytes <= budget_gib * GIB
        rows.append(f"  {'fits ' + format(budget_gib, 'g') + ' GiB':<{width}}  {'yes' if fits else 'NO'}")
    return "\n".join(rows)
