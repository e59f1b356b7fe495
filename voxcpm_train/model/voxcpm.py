"""`VoxCPMModel`: one pipeline stage of the VoxCPM backbone on megatron-core.

Module names (stable; the weight mapping in `voxcpm_train/convert/` is written against them). Stacks
are `StackBlock`s (megatron `TransformerBlock`), each layer a megatron `TransformerLayer`:
`layers.{i}.input_layernorm.weight`, `layers.{i}.self_attention.linear_qkv.weight` (fused QKV, per
query group g: [q heads of g, k_g, v_g] rows, megatron's layout), `layers.{i}.self_attention.linear_proj.weight`,
`layers.{i}.pre_mlp_layernorm.weight`, `layers.{i}.mlp.linear_fc1.weight` (rows [gate; up]),
`layers.{i}.mlp.linear_fc2.weight`; `{i}` is the index on this stage, the global index is
`first_layer + i` (`sharded_state_dict` uses the global one).

| ours | reference `VoxCPM2Model` | stage |
|---|---|---|
| `text_embedding.weight` (VocabParallelEmbedding) | `base_lm.embed_tokens.weight` | first |
| `feat_encoder.in_proj`, `feat_encoder.special_token` [1,1,1,H] | same | first |
| `feat_encoder.encoder.layers.*`, `feat_encoder.encoder.norm` | `feat_encoder.encoder.layers.*`, `.norm` | first |
| `enc_to_lm_proj` | same | first |
| `base_lm.layers.*` | `base_lm.layers.*` | split |
| `base_lm.norm` | `base_lm.norm` | last TSLM layer |
| `fsq_layer.in_proj`, `fsq_layer.out_proj` | same | last TSLM layer |
| `fusion_concat_proj` (voxcpm2 only) | same | last TSLM layer |
| `residual_lm.layers.*`, `residual_lm.norm` | same | split / last |
| `lm_to_dit_proj`, `res_to_dit_proj` | same | last |
| `feat_decoder.estimator.{in_proj,cond_proj,out_proj}` | same | last |
| `feat_decoder.estimator.{time_mlp,delta_time_mlp}.linear_{1,2}` | same | last |
| `feat_decoder.estimator.decoder.layers.*`, `.decoder.norm` | same | last |
| `stop_proj`, `stop_head` (no bias) | same | last |

Packed rows (`model.packed_seq_format`): `thd` (default) runs the TSLM/RALM on the B rows concatenated,
[B·T, 1, H], with megatron `PackedSeqParams` (cu_seqlens from `segment_ids`, `packed_seq.py`) handed to the
core attention; `dense_mask` runs them on [T, B, H] with a bool [B, 1, T, T] segment mask (the earlier
path, the reference of the THD one in tests). Both give the same losses and grads.

Stage I/O (see docs/architecture.md): one tensor [2T, B, H] crosses stages; its first half is the running
hidden state, its second half `feat_embed` until the TSLM ends, then the FSQ output (`lm_hidden`
unshifted). Under thd each half is the [B·T, 1, H] token stream viewed as [T, B, H] (a view, no copy).
With `sequence_parallel=True` (TP > 1) the TSLM/RALM run on sequence shards: the stage tensor is
[2T/tp, B, H] (this rank's 1/tp of each half; megatron's schedule divides `seq_length=2T` by tp),
LocEnc/LocDiT and the losses run on the whole sequence.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import init_method_normal

from voxcpm_train.config.model import ModelConfig, validate_model_config
from voxcpm_train.model.attention import core_attention_class
from voxcpm_train.model.fsq import FSQ
from voxcpm_train.model.layer_spec import check_fp8_available, resolve_transformer_impl
from voxcpm_train.model.local_dit import FeatDecoder, LocalDiT
from voxcpm_train.model.local_encoder import LocalEncoder
from voxcpm_train.model.losses import (
    FlowDraws,
    diffusion_loss_sum,
    draw_flow_noise,
    flow_matching_targets,
    stop_loss_sum,
)
from voxcpm_train.model.packed_seq import thd_packed_seq_params
from voxcpm_train.model.pipeline import stage_layers
from voxcpm_train.model.rope import LongRoPE, longrope_softmax_scale
from voxcpm_train.model.transformer import StackBlock, mup_residual_scale, stack_transformer_config


def segment_attention_mask(segment_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool [B, 1, T, T], True = blocked: keys of another segment (and later keys when causal).
    The `dense_mask` path only; `thd` never builds it."""
    blocked = segment_ids.unsqueeze(2) != segment_ids.unsqueeze(1)
    if causal:
        T = segment_ids.shape[1]
        blocked = blocked | torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).triu(1)
    return blocked.unsqueeze(1)


def shift_right(x: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, T, ...] -> y with y[:, t] = x[:, t-1], zero at t = 0 and at each segment start."""
    y = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    if segment_ids is not None:
        same = torch.ones_like(segment_ids, dtype=torch.bool)
        same[:, 1:] = segment_ids[:, 1:] == segment_ids[:, :-1]
        y = y * same.view(*same.shape, *([1] * (x.dim() - 2))).to(y.dtype)
    return y


class VoxCPMModel(MegatronModule):
    """One pipeline stage. `forward(batch, draws=None)`: on the last stage a dict of fp32 scalars
    `{"diff_sum", "stop_sum", "num_loss_positions"}`, else the inter-stage tensor [2T, B, H]."""

    # No weight is shared between stages (read by megatron's finalize_model_grads under PP).
    share_embeddings_and_output_weights = False

    def __init__(
        self,
        config: ModelConfig,
        pre_process: bool = True,
        post_process: bool = True,
        pp_rank: Optional[int] = None,
        pp_size: Optional[int] = None,
        use_cpu_initialization: bool = True,
        sequence_parallel: bool = False,
    ):
        validate_model_config(config)
        if pp_size is None:
            pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        if pp_rank is None:
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        layout = stage_layers(config, pp_size, pp_rank)
        n_base, n_res = config.lm.num_layers, config.residual_lm_num_layers
        lm_scale = longrope_softmax_scale(config.lm.head_dim, config.rope)
        impl = resolve_transformer_impl(config.transformer_impl)
        if config.fp8 is not None:
            check_fp8_available(config.fp8)

        def make_config(stack, num_layers, softmax_scale, lm_stack=False):
            # FP8 and sequence parallelism (TP > 1) apply to the TSLM/RALM stacks only; activation recompute
            # is model.recompute_* there and model.recompute_local_granularity in the LocEnc/LocDiT.
            return stack_transformer_config(
                config, stack, num_layers, softmax_scale, use_cpu_initialization=use_cpu_initialization,
                recompute=lm_stack, recompute_local=not lm_stack, sequence_parallel=sequence_parallel and lm_stack,
                fp8=lm_stack,
            )

        base_config = make_config(config.lm, n_base, lm_scale, lm_stack=True)
        super().__init__(config=base_config)
        self.model_config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.layout = layout
        self.transformer_impl = impl
        self.packed_seq_format = config.packed_seq_format
        self.input_tensor = None
        attention = core_attention_class(config.attention_backend)
        dtype = base_config.params_dtype
        hidden = config.lm.hidden_size
        v2 = config.architecture == "voxcpm2"

        if pre_process:
            self.text_embedding = VocabParallelEmbedding(
                config.vocab_size, hidden, init_method=init_method_normal(config.init_method_std), config=base_config
            )
            enc_config = make_config(
                config.encoder, config.encoder.num_layers, longrope_softmax_scale(config.encoder.head_dim, config.rope)
            )
            self.feat_encoder = LocalEncoder(
                enc_config, attention, config.rope, config.feat_dim, mup_residual_scale(config, config.encoder.num_layers),
                impl=impl,
            )
            self.enc_to_lm_proj = torch.nn.Linear(config.encoder.hidden_size, hidden, dtype=dtype)
        if layout.base_count or layout.holds_last_base_layer:
            self.base_lm = StackBlock(
                base_config, attention, causal=True, residual_scale=mup_residual_scale(config, n_base),
                first_layer=layout.base_first, num_layers=layout.base_count, total_layers=n_base,
                final_norm=layout.holds_last_base_layer, impl=impl,
            )
        if layout.holds_last_base_layer:
            self.fsq_layer = FSQ(hidden, config.fsq_latent_dim, config.fsq_scale, dtype=dtype)
            if v2:
                self.fusion_concat_proj = torch.nn.Linear(2 * hidden, hidden, dtype=dtype)
            if base_config.sequence_parallel:  # they see this rank's tokens only: grads summed over TP
                for param in self.fsq_layer.parameters():
                    setattr(param, "sequence_parallel", True)
                for param in (self.fusion_concat_proj.parameters() if v2 else ()):
                    setattr(param, "sequence_parallel", True)
        if layout.base_count or layout.residual_count:
            self.rope = LongRoPE(config.lm.head_dim, config.rope, fused=impl == "te")
        if layout.residual_count or post_process:
            res_rope = not config.residual_lm_no_rope
            self.residual_lm = StackBlock(
                make_config(config.lm, n_res, lm_scale if res_rope else None, lm_stack=True), attention, causal=True,
                residual_scale=mup_residual_scale(config, n_res), first_layer=layout.residual_first,
                num_layers=layout.residual_count, total_layers=n_res, final_norm=post_process, impl=impl,
            )
        if post_process:
            dit_hidden = config.dit.hidden_size
            self.lm_to_dit_proj = torch.nn.Linear(hidden, dit_hidden, dtype=dtype)
            self.res_to_dit_proj = torch.nn.Linear(hidden, dit_hidden, dtype=dtype)
            dit_config = make_config(
                config.dit, config.dit.num_layers, longrope_softmax_scale(config.dit.head_dim, config.rope)
            )
            self.feat_decoder = FeatDecoder(
                LocalDiT(
                    dit_config, attention, config.rope, config.feat_dim,
                    mup_residual_scale(config, config.dit.num_layers), time_in_mu=not v2, impl=impl,
                )
            )
            self.stop_proj = torch.nn.Linear(hidden, hidden, dtype=dtype)
            self.stop_head = torch.nn.Linear(hidden, 2, bias=False, dtype=dtype)
        self._mark_replicated_params()

    def _mark_replicated_params(self) -> None:
        """Replicated (non-TP-split) params get TP-averaged grads (megatron's finalize_model_grads)."""
        for param in self.parameters():
            if not getattr(param, "tensor_model_parallel", False) and not getattr(param, "sequence_parallel", False):
                setattr(param, "average_gradients_across_tp_domain", True)

    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous stage's [2T, B, H] tensor (megatron passes a one-element list)."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "VoxCPMModel takes one input tensor"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def _dtype(self) -> torch.dtype:
        return self.config.params_dtype

    def _local_positions(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> this TP rank's sequence shard under sequence parallelism, else x."""
        if not self.config.sequence_parallel:
            return x
        tp = parallel_state.get_tensor_model_parallel_world_size()
        shard = x.shape[0] // tp
        rank = parallel_state.get_tensor_model_parallel_rank()
        return x[rank * shard : (rank + 1) * shard]

    def _check_batch(self, batch: Dict[str, torch.Tensor], draws: Optional[FlowDraws]) -> None:
        """Raise a ValueError naming the first missing or mis-shaped micro-batch field."""
        cfg = self.model_config
        needed = ["text_mask", "audio_mask"]
        if self.pre_process:
            needed += ["text_tokens", "audio_feats"]
        if self.post_process:
            needed += ["audio_feats", "loss_mask", "labels"] + ([] if draws is not None else ["row_seeds"])
        missing = [k for k in needed if k not in batch]
        if missing:
            raise ValueError(f"micro-batch lacks {missing} (VoxCPMModel stage pre={self.pre_process}, post={self.post_process})")
        B, T = batch["text_mask"].shape
        for key in ("audio_mask", "text_tokens", "loss_mask", "labels", "position_ids", "segment_ids"):
            if key in batch and tuple(batch[key].shape) != (B, T):
                raise ValueError(f"micro-batch field {key} has shape {tuple(batch[key].shape)}, expected [B, T] = {[B, T]}")
        if "audio_feats" in batch and tuple(batch["audio_feats"].shape) != (B, T, cfg.patch_size, cfg.feat_dim):
            raise ValueError(
                f"micro-batch field audio_feats has shape {tuple(batch['audio_feats'].shape)}, expected "
                f"[B, T, model.patch_size, model.feat_dim] = {[B, T, cfg.patch_size, cfg.feat_dim]}"
            )
        if draws is not None and tuple(draws.noise.shape) != (B * T, cfg.patch_size, cfg.feat_dim):
            raise ValueError(f"draws.noise has shape {tuple(draws.noise.shape)}, expected [B*T, P, D] = {[B * T, cfg.patch_size, cfg.feat_dim]}")

    def forward(self, batch: Dict[str, torch.Tensor], draws: Optional[FlowDraws] = None):
        self._check_batch(batch, draws)
        cfg = self.model_config
        dtype = self._dtype()
        text_mask = batch["text_mask"].to(dtype)
        audio_mask = batch["audio_mask"].to(dtype)
        B, T = text_mask.shape
        segment_ids = batch.get("segment_ids")
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(T, device=text_mask.device).expand(B, T)
        sp = self.config.sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if sp and T % tp:
            raise ValueError(
                f"sequence parallelism needs the row length T={T} divisible by the tensor parallel size {tp}"
            )
        if self.config.fp8 and (B * T) % (16 * (tp if sp else 1)):
            raise ValueError(f"model.fp8 needs B*T={B}*{T} positions per micro-batch (per TP rank under sequence "
                             f"parallelism) divisible by 16: choose data.row_tokens accordingly")

        thd = self.packed_seq_format == "thd"
        if thd:  # rows concatenated: [B, T, ...] <-> [B*T, 1, ...] (views)
            to_stack = lambda x: x.reshape(B * T, 1, *x.shape[2:])
            from_stack = lambda x: x.reshape(B, T, *x.shape[2:])
            has_stack = hasattr(self, "base_lm") or hasattr(self, "residual_lm")
            packed = thd_packed_seq_params(segment_ids, B, T, text_mask.device) if has_stack else None
            attention_mask, rope_positions = None, position_ids.reshape(1, B * T)
        else:  # [B, T, ...] <-> [T, B, ...]
            to_stack = lambda x: x.transpose(0, 1).contiguous()
            from_stack = lambda x: x.transpose(0, 1)
            packed, rope_positions = None, position_ids
            attention_mask = segment_attention_mask(segment_ids, causal=True) if segment_ids is not None else None
        mask_tb = lambda m: self._local_positions(to_stack(m.unsqueeze(-1)))  # [B, T] -> [S(/tp), b, 1]

        if self.pre_process:
            feat_embed = self._encode_audio_positions(batch["audio_feats"].to(dtype), audio_mask)  # [B, T, H]
            text_embed = self.text_embedding(batch["text_tokens"])
            if cfg.use_mup:
                text_embed = text_embed * cfg.scale_emb
            x = text_mask.unsqueeze(-1) * text_embed + audio_mask.unsqueeze(-1) * feat_embed
            hidden, side = to_stack(x), to_stack(feat_embed)
            if sp:
                hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
                side = tensor_parallel.scatter_to_sequence_parallel_region(side)
        else:
            if self.input_tensor is None:
                raise RuntimeError("VoxCPMModel stage without pre_process needs set_input_tensor() first")
            stage_in = self.input_tensor.reshape(-1, 1, self.input_tensor.shape[-1]) if thd else self.input_tensor
            half = stage_in.shape[0] // 2  # the T (or B*T) positions, / tp under sequence parallelism
            hidden, side = stage_in[:half], stage_in[half:]

        cos_sin = self.rope(rope_positions) if hasattr(self, "rope") else None
        stack_kwargs = dict(attention_mask=attention_mask, packed_seq_params=packed)
        if hasattr(self, "base_lm"):
            hidden = self.base_lm(hidden, rotary_pos_emb=cos_sin, **stack_kwargs)
        if self.layout.holds_last_base_layer:
            h_fsq = self.fsq_layer(hidden) * mask_tb(audio_mask) + hidden * mask_tb(text_mask)
            feat = mask_tb(audio_mask) * side
            if cfg.architecture == "voxcpm2":
                hidden = self.fusion_concat_proj(torch.cat([h_fsq, feat], dim=-1))
            else:
                hidden = h_fsq + feat
            side = h_fsq
        if hasattr(self, "residual_lm"):
            res_cos_sin = None if cfg.residual_lm_no_rope else cos_sin
            hidden = self.residual_lm(hidden, rotary_pos_emb=res_cos_sin, **stack_kwargs)
        if not self.post_process:
            out = torch.cat([hidden, side], dim=0)
            return out.view(-1, B, out.shape[-1]) if thd else out  # the schedule's [2T(/tp), B, H]
        if sp:  # the losses run on the whole sequence, identically on every TP rank
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            side = tensor_parallel.gather_from_sequence_parallel_region(side, tensor_parallel_output_grad=False)
        return self._losses(batch, from_stack(side), from_stack(hidden), segment_ids, draws)

    def _encode_audio_positions(self, feats: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        """`enc_to_lm_proj(LocEnc(patch))` at audio positions, zeros elsewhere: feats [B, T, P, D] -> [B, T, H].

        Text and padding positions only ever enter the model multiplied by `audio_mask`, so they skip the
        LocEnc (the reference encodes every position and discards those)."""
        B, T, P, D = feats.shape
        index = torch.nonzero(audio_mask.reshape(-1) > 0).squeeze(1)
        keep = 1.0
        if index.numel() == 0:  # keep the graph (and every grad) defined on an audio-free micro-batch
            index, keep = torch.zeros(1, dtype=torch.long, device=feats.device), 0.0
        encoded = self.enc_to_lm_proj(self.feat_encoder(feats.reshape(B * T, P, D)[index].unsqueeze(0)))[0] * keep
        out = encoded.new_zeros(B * T, encoded.shape[-1]).index_copy(0, index, encoded)
        return out.view(B, T, -1)

    def _losses(self, batch, lm_out, res_out, segment_ids, draws: Optional[FlowDraws]):
        """Diffusion and stop loss sums over the loss positions (last stage)."""
        cfg = self.model_config
        dtype = self._dtype()
        feats = batch["audio_feats"].to(dtype)
        B, T, P, D = feats.shape
        loss_mask = batch["loss_mask"].reshape(-1)
        if draws is None:
            draws = draw_flow_noise(
                batch["row_seeds"], T, P, D, cfg.flow.cfg_rate, cfg.flow.t_mu, cfg.flow.t_sigma, device=feats.device
            )
        lm_hidden = shift_right(lm_out, segment_ids).reshape(B * T, -1)
        res_hidden = shift_right(res_out, segment_ids).reshape(B * T, -1)
        cond = shift_right(feats, segment_ids).reshape(B * T, P, D)
        x1 = feats.reshape(B * T, P, D)

        # Only loss positions reach the LocDiT and stop head (others carry zero weight).
        index = torch.nonzero(loss_mask > 0).squeeze(1)
        weight = loss_mask[index]
        if index.numel() == 0:  # keep the graph (and every grad) defined on a loss-free micro-batch
            index = torch.zeros(1, dtype=torch.long, device=loss_mask.device)
            weight = torch.zeros(1, dtype=loss_mask.dtype, device=loss_mask.device)
        sel = draws.select(index.to(draws.t.device)).to(device=feats.device, dtype=dtype)
        lm_sel, res_sel = lm_hidden[index], res_hidden[index]
        mu_lm, mu_res = self.lm_to_dit_proj(lm_sel), self.res_to_dit_proj(res_sel)
        if cfg.architecture == "voxcpm2":
            mu = torch.stack([mu_lm, mu_res], dim=1)  # [n, 2, H_dit]
        else:
            mu = (mu_lm + mu_res).unsqueeze(1)  # [n, 1, H_dit]
        mu = mu * sel.cfg_keep.view(-1, 1, 1)
        x_t, velocity = flow_matching_targets(x1[index], sel)
        pred = self.feat_decoder.estimator(x_t, mu, sel.t, cond[index])
        diff_sum = diffusion_loss_sum(pred, velocity, weight)

        stop_logits = self.stop_head(torch.nn.functional.silu(self.stop_proj(lm_sel)))
        stop_sum = stop_loss_sum(stop_logits, batch["labels"].reshape(-1)[index].long(), weight)
        return {
            "diff_sum": diff_sum,
            "stop_sum": stop_sum,
            "num_loss_positions": batch["loss_mask"].float().sum(),
        }
