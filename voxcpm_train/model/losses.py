"""Flow-matching draws and the two training losses (diffusion MSE, stop cross-entropy).

`FlowDraws` holds, for the N = B·T positions in row-major order, the CFG keep flag, the time t and the
noise z. `draw_flow_noise` makes them per row from `torch.Generator(device).manual_seed(row_seed)` in a fixed
order (cfg uniform, t normal, noise normal), so they do not depend on TP/PP/DP layout or micro-batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FlowDraws:
    """t [N] in (0, 1); noise [N, P, D]; cfg_keep [N] (1.0 keeps the DiT conditions, 0.0 drops them)."""

    t: torch.Tensor
    noise: torch.Tensor
    cfg_keep: torch.Tensor

    def select(self, index: torch.Tensor) -> "FlowDraws":
        return FlowDraws(self.t[index], self.noise[index], self.cfg_keep[index])

    def to(self, device=None, dtype=None) -> "FlowDraws":
        return FlowDraws(
            self.t.to(device=device, dtype=dtype),
            self.noise.to(device=device, dtype=dtype),
            self.cfg_keep.to(device=device, dtype=dtype),
        )


def draw_flow_noise(
    row_seeds: torch.Tensor,
    T: int,
    P: int,
    D: int,
    cfg_rate: float = 0.1,
    t_mu: float = -0.4,
    t_sigma: float = 1.0,
    device: torch.device | str = "cpu",
) -> FlowDraws:
    """Per-row draws: keep = U[0,1) > cfg_rate; t = sigmoid(t_mu + t_sigma·N(0,1)); z ~ N(0, I). fp32.

    Drawn on ``device`` with that device's generator (on an accelerator this avoids a host-side draw and
    copy per micro-batch); a device kind's stream differs from the CPU's, so runs compare bitwise only on
    the same device kind. Layout-independence holds on every kind (one generator per row)."""
    device = torch.device(device)
    t_rows, noise_rows, keep_rows = [], [], []
    for seed in row_seeds.tolist():
        gen = torch.Generator(device=device).manual_seed(int(seed))
        keep_rows.append((torch.rand(T, generator=gen, device=device) > cfg_rate).to(torch.float32))
        t_rows.append(torch.sigmoid(torch.randn(T, generator=gen, device=device) * t_sigma + t_mu))
        noise_rows.append(torch.randn(T, P, D, generator=gen, device=device))
    return FlowDraws(torch.cat(t_rows), torch.cat(noise_rows), torch.cat(keep_rows))


def flow_matching_targets(x1: torch.Tensor, draws: FlowDraws):
    """x_t = (1 - t)·x1 + t·z and target velocity v = z - x1 for x1 [N, P, D]."""
    t = draws.t.to(x1.dtype).view(-1, 1, 1)
    z = draws.noise.to(x1.dtype)
    return (1 - t) * x1 + t * z, z - x1


def diffusion_loss_sum(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_n weight[n] · mean_{P,D} (pred - target)² (fp32 scalar)."""
    per_position = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2))
    return (per_position * weight.float()).sum()


def stop_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_n weight[n] · CE(logits [N, 2], labels [N]) (fp32 scalar)."""
    return (F.cross_entropy(logits.float(), labels, reduction="none") * weight.float()).sum()


def combine_losses(out: dict, lambda_diff: float, lambda_stop: float) -> torch.Tensor:
    """(λ_diff·diff_sum + λ_stop·stop_sum) / max(num_loss_positions, 1) for one micro-batch."""
    return (lambda_diff * out["diff_sum"] + lambda_stop * out["stop_sum"]) / out["num_loss_positions"].clamp(min=1.0)
