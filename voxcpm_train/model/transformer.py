"""Transformer stacks: a megatron `TransformerConfig` per stack and `StackBlock`, the layers
[first_layer, first_layer + n) of a stack of `total_layers`, numbered globally.

Inside a stack block megatron sees `pipeline_model_parallel_size=1` (the stage split is ours, see
`pipeline.py`); layer numbers and `sharded_state_dict` keys are global so torch_dist checkpoints
reshard across PP. Tensors are [S, B, H] (sequence first).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from voxcpm_train.config.model import ModelConfig, StackConfig
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.dict_utils import nested_values

from voxcpm_train.model.layer_spec import RMSNorm, minicpm_layer_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stack_transformer_config(
    cfg: ModelConfig,
    stack: StackConfig,
    num_layers: int,
    softmax_scale: Optional[float],
    use_cpu_initialization: bool = True,
    sequence_parallel: bool = False,
    tensor_model_parallel_size: Optional[int] = None,
    recompute: bool = False,
    fp8: bool = False,
    recompute_local: bool = False,
) -> TransformerConfig:
    """megatron `TransformerConfig` of one stack (PP size 1 inside; TP from parallel_state).

    `recompute` applies `cfg.recompute_*`, `fp8` applies `cfg.fp8*` (the TSLM/RALM stacks);
    `recompute_local` applies `cfg.recompute_local_granularity` (the LocEnc/LocDiT stacks: megatron's full
    recompute, uniform, one layer per checkpoint)."""
    if recompute and recompute_local:
        raise ValueError("a stack is recomputed as a TSLM/RALM stack or as a local one, not both")
    tp = tensor_model_parallel_size or parallel_state.get_tensor_model_parallel_world_size()
    for key, value in (("num_attention_heads", stack.num_attention_heads), ("num_query_groups", stack.num_query_groups)):
        if value % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {key}={value} of a model stack")
    dtype = DTYPES[cfg.params_dtype]
    granularity = cfg.recompute_granularity if recompute else None
    recompute_kwargs = {}
    if recompute_local:
        granularity = cfg.recompute_local_granularity
        if granularity == "full":
            recompute_kwargs = dict(recompute_method="uniform", recompute_num_layers=1)
    elif granularity == "full":
        recompute_kwargs = dict(recompute_method=cfg.recompute_method, recompute_num_layers=cfg.recompute_num_layers)
    elif granularity == "selective":
        recompute_kwargs = dict(recompute_modules=["core_attn"])
    fp8_kwargs = {}
    if fp8 and cfg.fp8 is not None:
        fp8_kwargs = dict(
            fp8=cfg.fp8, fp8_recipe="tensorwise" if cfg.fp8_recipe == "current" else "delayed",
            fp8_amax_history_len=cfg.fp8_amax_history_len, fp8_amax_compute_algo="max",
        )
    return TransformerConfig(
        **fp8_kwargs,
        recompute_granularity=granularity,
        **recompute_kwargs,
        num_layers=num_layers,
        hidden_size=stack.hidden_size,
        ffn_hidden_size=stack.ffn_hidden_size,
        num_attention_heads=stack.num_attention_heads,
        num_query_groups=stack.num_query_groups,
        kv_channels=stack.head_dim,
        softmax_scale=softmax_scale,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        rotary_interleaved=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        init_method_std=cfg.init_method_std,
        use_cpu_initialization=use_cpu_initialization,
    )


def mup_residual_scale(cfg: ModelConfig, stack_layers: int) -> float:
    """μP residual branch scale `scale_depth / sqrt(num_layers)` (1.0 without μP)."""
    return cfg.scale_depth / math.sqrt(stack_layers) if cfg.use_mup else 1.0


class StackBlock(TransformerBlock):
    """Layers [first_layer, first_layer + num_layers) of a `total_layers` stack, plus the stack's
    final RMSNorm `norm` when `final_norm`. `impl`: the layer spec (local | te, see layer_spec.py).
    `forward(hidden [S, B, H] or THD [t, 1, H], attention_mask, rotary_pos_emb, packed_seq_params=None)`.

    In `sharded_state_dict` the layers' `_extra_state` objects (None for local linears, Transformer
    Engine's FP8 scaling state for te ones) are stored as None: the two specs write the same checkpoint
    and loading never unpickles TE state (FP8 delayed scaling rebuilds its amax history after a resume).
    """

    def __init__(
        self,
        config: TransformerConfig,
        core_attention: type,
        causal: bool,
        residual_scale: float,
        first_layer: int,
        num_layers: int,
        total_layers: int,
        final_norm: bool,
        impl: str = "local",
    ):
        spec = minicpm_layer_spec(core_attention, causal, residual_scale, impl=impl)
        self.first_layer = first_layer
        self.total_layers = total_layers
        super().__init__(
            config,
            TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=None),
            post_layer_norm=False,
            pre_process=True,
            post_process=False,
        )
        for index, layer in enumerate(self.layers):
            layer.layer_number = first_layer + index + 1
        self.norm = RMSNorm(config, config.hidden_size, config.layernorm_epsilon) if final_norm else None

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        if len(self.layers):
            hidden_states = super().forward(hidden_states, attention_mask, rotary_pos_emb=rotary_pos_emb, **kwargs)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return hidden_states

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        assert not sharded_offsets, "Unexpected sharded offsets"
        non_homogeneous = bool((metadata or {}).get("non_homogeneous_layers", False)) or bool(
            (metadata or {}).get("singleton_local_shards", False)
        )
        sharded = {}
        for index, layer in enumerate(self.layers):
            global_index = self.first_layer + index
            local_prefix = f"{prefix}layers.{index}."
            if non_homogeneous:
                sharded_prefix, offsets = f"{prefix}layers.{global_index}.", []
            else:
                sharded_prefix, offsets = f"{prefix}layers.", [(0, global_index, self.total_layers)]
            layer_sd = layer.sharded_state_dict(local_prefix, offsets, metadata)
            for value in nested_values(layer_sd):
                if isinstance(value, ShardedObject) and value.key.endswith("_extra_state"):
                    value.data = None
            replace_prefix_for_sharding(layer_sd, local_prefix, sharded_prefix)
            sharded.update(layer_sd)
        if self.norm is not None:
            sharded.update(sharded_state_dict_default(self.norm, f"{prefix}norm.", (), metadata, tp_group=self.tp_group))
        return sharded
