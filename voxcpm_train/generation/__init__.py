"""Autoregressive generation with our megatron model (validation samples during training)."""
from voxcpm_train.generation.sampler import GenerationConfig, euler_cfg_solve, generate_latents

__all__ = ["GenerationConfig", "euler_cfg_solve", "generate_latents"]
