"""megatron `forward_step_func` of VoxCPM: micro-batch -> model -> (loss_sum, num_loss_positions, logs)."""
from __future__ import annotations

import torch


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def make_forward_step(model_cfg, device):
    lam_diff, lam_stop = float(model_cfg.lambda_diff), float(model_cfg.lambda_stop)

    def loss_func(out: dict):
        diff_sum, stop_sum = out["diff_sum"].float(), out["stop_sum"].float()
        loss_sum = lam_diff * diff_sum + lam_stop * stop_sum
        return loss_sum, out["num_loss_positions"], {"diff_sum": diff_sum, "stop_sum": stop_sum}

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device)
        return model(batch), loss_func

    return forward_step
