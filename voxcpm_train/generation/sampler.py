"""Autoregressive VoxCPM sampler on `VoxCPMModel` (every stage in one process: pp = 1; at tp > 1 all TP
ranks run it in lockstep with the same seed).

Per generated patch: TSLM and RALM run over the sequence so far (no KV cache: samples during training are
short), the LocDiT solves the flow ODE from t=1 (noise) to t=0 with an Euler solver on a sway-sampled
time grid, classifier-free guidance and CFG-Zero* (zeroed first step(s), optimised unconditional scale),
the new patch is encoded by LocEnc and appended; the stop head ends generation.

Prompt layout (TTS): `[text ids..., 101]`, then one position per generated patch (DESIGN §5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

AUDIO_START = 101


@dataclass
class GenerationConfig:
    max_patches: int = 200
    min_patches: int = 2
    timesteps: int = 10
    cfg_value: float = 2.0
    sway_coef: float = 1.0
    cfg_zero_star: bool = True
    temperature: float = 1.0
    seed: int = 0


def sway_time_grid(n: int, coef: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """t from 1 to 0 in n steps, warped towards t=1 by sway sampling: t + c (cos(pi t / 2) - 1 + t)."""
    t = torch.linspace(1.0, 0.0, n + 1, dtype=dtype, device=device)
    return t + coef * (torch.cos(math.pi / 2 * t) - 1.0 + t)


def euler_cfg_solve(estimator, mu: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                    gen: GenerationConfig) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t=1 (noise [b, P, D]) to t=0.

    `estimator(x_t [n, P, D], mu [n, K, H], t [n], cond [n, P, D]) -> v [n, P, D]`; guidance:
    v = s*·v_u + w (v_c - s*·v_u), s* = <v_c, v_u> / |v_u|^2 (CFG-Zero*; 1 without it), and the first
    max(1, int(0.04 (steps + 1))) steps use v = 0 under CFG-Zero*.
    """
    b = noise.shape[0]
    grid = sway_time_grid(gen.timesteps, gen.sway_coef, noise.dtype, noise.device)
    x = noise
    zero_steps = max(1, int((gen.timesteps + 1) * 0.04))
    for i in range(gen.timesteps):
        t, dt = grid[i], grid[i] - grid[i + 1]
        if gen.cfg_zero_star and i < zero_steps:
            v = torch.zeros_like(x)
        else:
            v_both = estimator(torch.cat([x, x]), torch.cat([mu, torch.zeros_like(mu)]),
                               t.expand(2 * b), torch.cat([cond, cond]))
            v_c, v_u = v_both[:b], v_both[b:]
            if gen.cfg_zero_star:
                dot = (v_c.reshape(b, -1) * v_u.reshape(b, -1)).sum(1)
                scale = (dot / (v_u.reshape(b, -1).pow(2).sum(1) + 1e-8)).view(b, 1, 1)
            else:
                scale = torch.ones(b, 1, 1, dtype=x.dtype, device=x.device)
            v = v_u * scale + gen.cfg_value * (v_c - v_u * scale)
        x = x - dt * v
    return x


@torch.no_grad()
def generate_latents(model, text_ids: List[int], gen: GenerationConfig,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Latent frames [n_patches * P, D] for `text_ids` (without the 101 marker) from an unwrapped
    `VoxCPMModel` holding all stages."""
    if not (model.pre_process and model.post_process):
        raise ValueError("generation needs every pipeline stage in one process (pp = 1)")
    cfg = model.model_config
    dtype = model.config.params_dtype
    device = next(model.parameters()).device
    P, D = cfg.patch_size, cfg.feat_dim
    v2 = cfg.architecture == "voxcpm2"
    generator = generator or torch.Generator(device="cpu").manual_seed(gen.seed)

    ids = torch.tensor(list(text_ids) + [AUDIO_START], dtype=torch.long, device=device).unsqueeze(0)
    n_text = ids.shape[1]
    text_embed = model.text_embedding(ids)                       # [1, n_text, H]
    if cfg.use_mup:
        text_embed = text_embed * cfg.scale_emb
    feat_embeds: List[torch.Tensor] = []                         # [1, H] per generated patch
    patches: List[torch.Tensor] = []                             # [P, D]
    prev = torch.zeros(1, P, D, dtype=dtype, device=device)
    for step in range(gen.max_patches):
        n_audio = len(feat_embeds)
        x = torch.cat([text_embed] + [f.unsqueeze(1) for f in feat_embeds], dim=1)   # [1, L, H]
        L = x.shape[1]
        audio_mask = torch.zeros(1, L, 1, dtype=dtype, device=device)
        audio_mask[:, n_text:] = 1
        pos = torch.arange(L, device=device).unsqueeze(0)
        freqs = model.rope(pos)
        h = model.base_lm(x.transpose(0, 1), attention_mask=None, rotary_pos_emb=freqs)   # [L, 1, H]
        am = audio_mask.transpose(0, 1)
        h_fsq = model.fsq_layer(h) * am + h * (1 - am)
        side = torch.zeros_like(h)
        if n_audio:
            side[n_text:] = torch.stack(feat_embeds, 0)
        if v2:
            r_in = model.fusion_concat_proj(torch.cat([h_fsq, side * am], dim=-1))
        else:
            r_in = h_fsq + side * am
        res_freqs = None if cfg.residual_lm_no_rope else freqs
        r = model.residual_lm(r_in, attention_mask=None, rotary_pos_emb=res_freqs)
        lm_hidden, res_hidden = h_fsq[-1], r[-1]                 # [1, H]
        mu_lm, mu_res = model.lm_to_dit_proj(lm_hidden), model.res_to_dit_proj(res_hidden)
        mu = torch.stack([mu_lm, mu_res], 1) if v2 else (mu_lm + mu_res).unsqueeze(1)
        noise = torch.randn(1, P, D, generator=generator).to(device=device, dtype=dtype) * gen.temperature
        patch = euler_cfg_solve(model.feat_decoder.estimator, mu, prev, noise, gen)       # [1, P, D]
        patches.append(patch[0])
        prev = patch
        # the stop head reads the hidden state that produced this patch: "this patch is the last"
        stop = model.stop_head(torch.nn.functional.silu(model.stop_proj(lm_hidden))).argmax(-1).item()
        if step > gen.min_patches and stop == 1:
            break
        feat_embeds.append(model.enc_to_lm_proj(model.feat_encoder(patch.unsqueeze(1)))[:, 0])
    if not patches:
        return torch.zeros(0, D)
    return torch.cat(patches, 0).float().cpu()
