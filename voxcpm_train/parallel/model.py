"""Build this pipeline stage's model and wrap it in megatron DDP."""

from __future__ import annotations

from typing import Callable

import torch

from .state import pp_stage_flags

__all__ = ["build_model_chunks", "unwrap_model"]


def build_model_chunks(
    model_provider: Callable[..., torch.nn.Module],
    ddp_config,
    *,
    device: torch.device | str = "cpu",
    param_dtype: torch.dtype = torch.float32,
) -> list:
    """Build and wrap the model of this rank's PP stage (one chunk: no virtual pipeline).

    ``model_provider(pre_process=..., post_process=...)`` returns a ``MegatronModule`` whose
    ``config`` is a ``TransformerConfig``. Parameters are moved to ``device`` and cast to
    ``param_dtype`` (fp32 on CPU; bf16 on GPU/NPU, then use ``ddp_config.grad_reduce_in_fp32``
    and a bf16 ``OptimizerConfig`` for fp32 main grads/params); every ``TransformerConfig`` in
    the model gets ``params_dtype = pipeline_dtype = param_dtype`` (and the bf16/fp16 flags).
    Losses are per token: ``config.calculate_per_token_loss`` is set to True.
    """
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.enums import ModelType

    pre_process, post_process = pp_stage_flags()
    model = model_provider(pre_process=pre_process, post_process=post_process)
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model provider returned {type(model).__name__} without a .config")
    if not hasattr(model, "model_type"):
        model.model_type = ModelType.encoder_or_decoder
    if not hasattr(model, "share_embeddings_and_output_weights"):
        # finalize_model_grads (PP > 1) asks every chunk; only LanguageModule defines it
        model.share_embeddings_and_output_weights = False
    config.calculate_per_token_loss = True
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    if param_dtype != torch.float32 and not ddp_config.grad_reduce_in_fp32:
        raise ValueError("low-precision params need ddp_config.grad_reduce_in_fp32=True")
    model.to(device=device)
    if param_dtype != torch.float32:
        model.to(dtype=param_dtype)
    _align_config_dtypes(model, param_dtype)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    return [ddp]


def _align_config_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every TransformerConfig in the model follows the parameter dtype (compute casts, the
    pipeline's p2p buffers, megatron's bf16/fp16 flags), whatever the provider built with."""
    from megatron.core.transformer import TransformerConfig

    seen = set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, TransformerConfig) and id(cfg) not in seen:
            seen.add(id(cfg))
            cfg.params_dtype = cfg.pipeline_dtype = dtype
            cfg.bf16, cfg.fp16 = dtype == torch.bfloat16, dtype == torch.float16


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The module inside megatron's DDP / Float16Module wrappers."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk
