"""One optimizer step over the micro-batches of a global batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .optim import inner_optimizers
from .state import any_rank, comm_device

__all__ = ["StepResult", "train_step", "eval_step"]

_LOSS_SUM, _NUM_TOKENS = "_loss_sum", "_num_tokens"


@dataclass
class StepResult:
    """``loss`` = Σ loss_sum / Σ num_tokens over the global batch; ``logs`` = the loss function's
    log terms summed over micro-batches and data-parallel ranks (same on every rank)."""

    loss: float
    num_tokens: int
    grad_norm: float
    skipped: bool
    lr: float
    logs: dict = field(default_factory=dict)


def _wrap_forward_step(forward_step_func):
    """Make the loss function record detached clones of its terms (the schedule may modify the
    loss tensor in place) and hand the schedule an integer token count."""

    def forward_step(data_iterator, model):
        output, loss_func = forward_step_func(data_iterator, model)

        def loss_with_record(output_tensor):
            loss_sum, num_tokens, logs = loss_func(output_tensor)
            record = {k: torch.as_tensor(v).detach().clone().double() for k, v in logs.items()}
            record[_LOSS_SUM] = loss_sum.detach().clone().double()
            record[_NUM_TOKENS] = torch.as_tensor(num_tokens).detach().clone().double()
            return loss_sum, torch.as_tensor(num_tokens).round().to(torch.int), record

        return output, loss_with_record

    return forward_step


def _reduce_logs(records: list[dict]) -> dict | None:
    """Sum the micro-batch records over micro-batches and the DP group (last PP stage only), then
    share them with every PP stage."""
    from megatron.core import parallel_state as ps

    summed = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        keys = sorted(records[0]) if records else [_LOSS_SUM, _NUM_TOKENS]
        # summed where the records live (one host copy per step, not one per key and micro-batch)
        vec = torch.zeros(len(keys), dtype=torch.float64, device=comm_device())
        for r in records:
            vec += torch.stack([r[k].reshape(()).to(vec) for k in keys])
        dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        if dist.get_world_size(dp_group) > 1:
            dist.all_reduce(vec, group=dp_group)
        summed = dict(zip(keys, vec.tolist()))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        obj = [summed]
        dist.broadcast_object_list(
            obj, src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        summed = obj[0]
    return summed


def train_step(
    forward_step_func: Callable,
    data_iterator: Iterator,
    model_chunks: list,
    optimizer,
    scheduler=None,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    increment: int = 1,
) -> StepResult:
    """Forward/backward over ``num_microbatches`` micro-batches, then clip and step.

    ``forward_step_func(data_iterator, model) -> (output, loss_func)`` as in megatron, with
    ``loss_func(output) -> (loss_sum, num_tokens, logs)`` (per-token loss: gradients are divided by
    the global token count). A step whose loss or grad norm is non-finite on any rank is skipped:
    weights, optimizer state and scheduler stay untouched, and ``skipped`` is True.
    ``scheduler.step(increment)`` runs after a successful update.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.pipeline_parallel import get_forward_backward_func

    groups = optimizer.param_groups
    lr = groups[0]["lr"] if groups else float("nan")  # the LR this step uses
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    records = get_forward_backward_func()(
        forward_step_func=_wrap_forward_step(forward_step_func),
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    logs = _reduce_logs(records)
    num_tokens = logs.pop(_NUM_TOKENS)
    loss_sum = logs.pop(_LOSS_SUM)
    loss = loss_sum / num_tokens if num_tokens > 0 else float("nan")

    found_inf = optimizer.prepare_grads()
    grad_norm = optimizer.get_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else 0.0
    bad = found_inf or not math.isfinite(loss) or not math.isfinite(grad_norm)
    skipped = any_rank(bad)

    if not skipped:
        for opt in inner_optimizers(optimizer):
            if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
                continue
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(
                    params,
                    max_norm=opt.config.clip_grad,
                    total_norm=grad_norm,
                    use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        if not optimizer.step_with_ready_grads():
            raise RuntimeError("optimizer.step_with_ready_grads() reported failure")
        if scheduler is not None:
            scheduler.step(increment=increment)
    return StepResult(loss, int(round(num_tokens)), grad_norm, skipped, lr, logs)


def eval_step(
    forward_step_func: Callable,
    data_iterator: Iterator,
    model_chunks: list,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> tuple[float, float, dict]:
    """Forward only over ``num_microbatches`` micro-batches (same ``forward_step_func`` contract as
    :func:`train_step`): ``(loss, num_tokens, logs)`` summed over micro-batches and DP ranks, on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    records = get_forward_backward_func()(
        forward_step_func=_wrap_forward_step(forward_step_func),
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    logs = _reduce_logs(records)
    num_tokens = logs.pop(_NUM_TOKENS)
    loss_sum = logs.pop(_LOSS_SUM)
    return (loss_sum / num_tokens if num_tokens > 0 else float("nan")), num_tokens, logs
