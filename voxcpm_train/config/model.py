"""`ModelConfig`: the VoxCPM model group (`configs/model/*.yaml`), its validation and the conversion
from/to the reference `VoxCPMConfig` (`config.json` of an HF-format model folder).

Sizes are counts (layers, heads) or widths (features). A stack with `kv_channels: null` uses
`hidden_size // num_attention_heads` as its head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

ARCHITECTURES = ("voxcpm2", "voxcpm")
ATTENTION_BACKENDS = ("auto", "sdpa", "te", "npu")
TRANSFORMER_IMPLS = ("auto", "local", "te")
PACKED_SEQ_FORMATS = ("thd", "dense_mask")
FP8_FORMATS = (None, "e4m3", "hybrid")
FP8_RECIPES = ("delayed", "current")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


@dataclass
class StackConfig:
    """One MiniCPM-4 transformer stack (pre-norm RMSNorm, GQA attention, SwiGLU MLP)."""

    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels else self.hidden_size // self.num_attention_heads


@dataclass
class RopeConfig:
    """LongRoPE: rotate-half RoPE whose frequencies are divided by per-dimension factors.

    `short_factor` applies while `max_position_embeddings <= original_max_position_embeddings`,
    else `long_factor`; cos/sin are scaled by sqrt(1 + ln(max/original) / ln(original)).
    Empty factor lists mean plain RoPE (all factors 1).
    """

    theta: float = 10000.0
    max_position_embeddings: int = 32768
    original_max_position_embeddings: int = 32768
    short_factor: List[float] = field(default_factory=list)
    long_factor: List[float] = field(default_factory=list)


@dataclass
class FlowConfig:
    """Flow-matching training draws: CFG dropout rate and the logit-normal t distribution."""

    cfg_rate: float = 0.1
    t_mu: float = -0.4
    t_sigma: float = 1.0


@dataclass
class ModelConfig:
    """The whole VoxCPM backbone (TSLM, RALM, LocEnc, LocDiT, FSQ, projections, stop head)."""

    # voxcpm2: RALM input = fusion_concat_proj(cat(h_fsq, feat)), 2 DiT condition tokens.
    # voxcpm (v1): RALM input = h_fsq + feat, 1 DiT condition token (lm + res projections summed).
    architecture: str = "voxcpm2"
    vocab_size: int = 256
    lm: StackConfig = field(default_factory=StackConfig)
    residual_lm_num_layers: int = 2
    residual_lm_no_rope: bool = True
    encoder: StackConfig = field(default_factory=StackConfig)
    dit: StackConfig = field(default_factory=StackConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    norm_eps: float = 1e-5
    patch_size: int = 4
    feat_dim: int = 64
    fsq_latent_dim: int = 16
    fsq_scale: int = 9
    # muP: text embeddings times scale_emb, residual branches times scale_depth / sqrt(num_layers).
    use_mup: bool = False
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: int = 256
    flow: FlowConfig = field(default_factory=FlowConfig)
    lambda_diff: float = 1.0
    lambda_stop: float = 1.0
    max_length: int = 8192
    bos_token_id: int = 1
    eos_token_id: int = 2
    # auto = te on CUDA when transformer_engine imports, npu on Ascend, else torch SDPA.
    attention_backend: str = "auto"
    # Layer implementation: local = megatron's ColumnParallelLinear/RowParallelLinear + our fp32-variance
    # RMSNorm and fp32 LongRoPE; te = Transformer Engine (RMSNorm fused into the QKV and fc1 linears,
    # TE row-parallel linears, TE's fused RoPE with our per-dimension frequencies); auto = te on CUDA with
    # Transformer Engine installed, else local. Both give the same checkpoint keys.
    transformer_impl: str = "auto"
    # How packed rows reach attention: thd = per-segment boundaries (cu_seqlens, megatron PackedSeqParams
    # in the `thd` format; stacks run on [B*T, 1, H]); dense_mask = a bool [B, 1, T, T] segment mask
    # (the earlier path, kept as the reference of the THD path in tests).
    packed_seq_format: str = "thd"
    # FP8 GEMMs in the TSLM/RALM layers (Transformer Engine, transformer_impl te, compute capability >= 8.9):
    # null | e4m3 | hybrid (e4m3 forward, e5m2 gradients); recipe delayed (amax history) | current
    # (per-tensor current scaling, megatron's `tensorwise`).
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    params_dtype: str = "float32"
    init_method_std: float = 0.02
    # Layers of the TSLM+RALM list per pipeline stage (None = even split).
    pipeline_layers: Optional[List[int]] = None
    # Activation recompute of the TSLM/RALM layers (megatron): null | full | selective (core attention).
    recompute_granularity: Optional[str] = None
    recompute_method: str = "uniform"  # full: uniform | block
    recompute_num_layers: int = 1  # full: layers per recompute unit (uniform) or per stage (block)
    # Activation recompute of the LocEnc/LocDiT layers (megatron full, uniform, one layer per checkpoint):
    # null | full. Their short per-position sequences (P+1 and 2+1+2P tokens) hold most of the activations.
    recompute_local_granularity: Optional[str] = None


def register() -> None:
    """Store the schema as `model/model_schema` (presets list it first in their defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="model", name="model_schema", node=ModelConfig)


# --------------------------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------------------------- #


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_stack(cfg: StackConfig, key: str) -> None:
    for name in ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups"):
        value = getattr(cfg, name)
        _check(isinstance(value, int) and value > 0, f"{key}.{name}={value} must be a positive integer")
    if cfg.kv_channels is None:
        _check(
            cfg.hidden_size % cfg.num_attention_heads == 0,
            f"{key}.num_attention_heads={cfg.num_attention_heads} does not divide "
            f"hidden_size={cfg.hidden_size} (or set {key}.kv_channels)",
        )
    else:
        _check(cfg.kv_channels > 0, f"{key}.kv_channels={cfg.kv_channels} must be positive or null")
    _check(
        cfg.num_attention_heads % cfg.num_query_groups == 0,
        f"{key}.num_query_groups={cfg.num_query_groups} does not divide "
        f"num_attention_heads={cfg.num_attention_heads}",
    )
    _check(cfg.head_dim % 2 == 0, f"{key}.kv_channels: head dim {cfg.head_dim} must be even for RoPE")


def validate_model_config(cfg: Any, prefix: str = "model") -> None:
    """Raise one `ConfigError` naming the first wrong key (e.g. `model.lm.num_attention_heads=3 ...`)."""
    _check(cfg.architecture in ARCHITECTURES, f"{prefix}.architecture={cfg.architecture!r} is not one of {ARCHITECTURES}")
    _check(cfg.vocab_size > 104, f"{prefix}.vocab_size={cfg.vocab_size} must exceed 104 (audio/ref marker ids 101-104)")
    for name in ("lm", "encoder", "dit"):
        _validate_stack(getattr(cfg, name), f"{prefix}.{name}")
    _check(
        cfg.residual_lm_num_layers > 0,
        f"{prefix}.residual_lm_num_layers={cfg.residual_lm_num_layers} must be a positive integer",
    )
    for name in ("patch_size", "feat_dim", "fsq_latent_dim", "fsq_scale", "max_length"):
        value = getattr(cfg, name)
        _check(isinstance(value, int) and value > 0, f"{prefix}.{name}={value} must be a positive integer")
    _check(cfg.norm_eps > 0, f"{prefix}.norm_eps={cfg.norm_eps} must be positive")
    rope = cfg.rope
    _check(rope.theta > 0, f"{prefix}.rope.theta={rope.theta} must be positive")
    _check(
        rope.original_max_position_embeddings > 0 and rope.max_position_embeddings > 0,
        f"{prefix}.rope.max_position_embeddings and original_max_position_embeddings must be positive",
    )
    rope_stacks = [("encoder", cfg.encoder), ("dit", cfg.dit), ("lm", cfg.lm)]
    for factor_key in ("short_factor", "long_factor"):
        factors = list(getattr(rope, factor_key))
        if not factors:
            continue
        _check(all(f > 0 for f in factors), f"{prefix}.rope.{factor_key} must hold positive numbers")
        for name, stack in rope_stacks:
            _check(
                len(factors) == stack.head_dim // 2,
                f"{prefix}.rope.{factor_key} has {len(factors)} factors; {prefix}.{name} head dim "
                f"{stack.head_dim} needs {stack.head_dim // 2}",
            )
    _check(
        cfg.attention_backend in ATTENTION_BACKENDS,
        f"{prefix}.attention_backend={cfg.attention_backend!r} is not one of {ATTENTION_BACKENDS}",
    )
    _check(
        cfg.transformer_impl in TRANSFORMER_IMPLS,
        f"{prefix}.transformer_impl={cfg.transformer_impl!r} is not one of {TRANSFORMER_IMPLS}",
    )
    _check(
        cfg.packed_seq_format in PACKED_SEQ_FORMATS,
        f"{prefix}.packed_seq_format={cfg.packed_seq_format!r} is not one of {PACKED_SEQ_FORMATS}",
    )
    _check(cfg.fp8 in FP8_FORMATS, f"{prefix}.fp8={cfg.fp8!r} is not one of null, e4m3, hybrid")
    _check(cfg.fp8_recipe in FP8_RECIPES, f"{prefix}.fp8_recipe={cfg.fp8_recipe!r} is not one of {FP8_RECIPES}")
    _check(cfg.fp8_amax_history_len > 0, f"{prefix}.fp8_amax_history_len={cfg.fp8_amax_history_len} must be positive")
    if cfg.transformer_impl == "te":
        _check(
            cfg.attention_backend != "npu",
            f"{prefix}.attention_backend=npu cannot run in {prefix}.transformer_impl=te (Transformer Engine is CUDA only)",
        )
        _check(
            cfg.packed_seq_format == "thd",
            f"{prefix}.transformer_impl=te needs {prefix}.packed_seq_format=thd (TE's fused RoPE takes one "
            f"position table per sequence, not per-row positions of a [T, B] batch)",
        )
    if cfg.fp8 is not None:
        _check(
            cfg.transformer_impl in ("te", "auto"),
            f"{prefix}.fp8={cfg.fp8!r} needs {prefix}.transformer_impl=te (FP8 GEMMs are Transformer Engine's)",
        )
    _check(cfg.params_dtype in PARAMS_DTYPES, f"{prefix}.params_dtype={cfg.params_dtype!r} is not one of {PARAMS_DTYPES}")
    _check(0.0 <= cfg.flow.cfg_rate < 1.0, f"{prefix}.flow.cfg_rate={cfg.flow.cfg_rate} must be in [0, 1)")
    _check(cfg.flow.t_sigma > 0, f"{prefix}.flow.t_sigma={cfg.flow.t_sigma} must be positive")
    _check(cfg.lambda_diff >= 0 and cfg.lambda_stop >= 0, f"{prefix}.lambda_diff/lambda_stop must be >= 0")
    _check(
        cfg.recompute_granularity in (None, "full", "selective"),
        f"{prefix}.recompute_granularity={cfg.recompute_granularity!r} is not one of null, full, selective",
    )
    _check(cfg.recompute_method in ("uniform", "block"), f"{prefix}.recompute_method={cfg.recompute_method!r} is not one of uniform, block")
    _check(cfg.recompute_num_layers > 0, f"{prefix}.recompute_num_layers={cfg.recompute_num_layers} must be positive")
    _check(
        cfg.recompute_local_granularity in (None, "full"),
        f"{prefix}.recompute_local_granularity={cfg.recompute_local_granularity!r} is not one of null, full",
    )
    if cfg.pipeline_layers is not None:
        total = cfg.lm.num_layers + cfg.residual_lm_num_layers
        layers = list(cfg.pipeline_layers)
        _check(
            all(isinstance(n, int) and n >= 0 for n in layers) and sum(layers) == total,
            f"{prefix}.pipeline_layers={layers} must be non-negative counts summing to "
            f"lm.num_layers + residual_lm_num_layers = {total}",
        )


def rope_scaling_factor(rope: RopeConfig) -> float:
    """LongRoPE attention factor sqrt(1 + ln(max/original) / ln(original)); 1.0 when max <= original."""
    scale = rope.max_position_embeddings / rope.original_max_position_embeddings
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(scale) / math.log(rope.original_max_position_embeddings))


def rope_factors(rope: RopeConfig) -> List[float]:
    """The per-dimension factors in use (short or long), empty for plain RoPE."""
    long = rope.max_position_embeddings > rope.original_max_position_embeddings
    return list(rope.long_factor if long else rope.short_factor)


# --------------------------------------------------------------------------------------------- #
# Reference config.json (VoxCPMConfig) <-> ModelConfig
# --------------------------------------------------------------------------------------------- #


def _stack_from_reference(block: dict, lm: StackConfig) -> StackConfig:
    return StackConfig(
        hidden_size=block["hidden_dim"],
        ffn_hidden_size=block["ffn_dim"],
        num_layers=block["num_layers"],
        num_attention_heads=block["num_heads"],
        num_query_groups=lm.num_query_groups,  # the reference copies the LM's KV heads
        kv_channels=block.get("kv_channels"),
    )


def from_reference_config(ref: dict) -> ModelConfig:
    """`ModelConfig` from a reference `config.json` dict (architecture voxcpm2 or voxcpm)."""
    lm_ref = ref["lm_config"]
    arch = ref.get("architecture", "voxcpm")
    lm = StackConfig(
        hidden_size=lm_ref["hidden_size"],
        ffn_hidden_size=lm_ref["intermediate_size"],
        num_layers=lm_ref["num_hidden_layers"],
        num_attention_heads=lm_ref["num_attention_heads"],
        num_query_groups=lm_ref["num_key_value_heads"],
        kv_channels=lm_ref.get("kv_channels"),
    )
    scaling = lm_ref.get("rope_scaling") or {}
    rope = RopeConfig(
        theta=float(lm_ref.get("rope_theta", 10000.0)),
        max_position_embeddings=lm_ref["max_position_embeddings"],
        original_max_position_embeddings=scaling.get(
            "original_max_position_embeddings", lm_ref["max_position_embeddings"]
        ),
        short_factor=list(scaling.get("short_factor", [])),
        long_factor=list(scaling.get("long_factor", [])),
    )
    cfm = ref["dit_config"].get("cfm_config", {})
    return ModelConfig(
        architecture=arch,
        vocab_size=lm_ref["vocab_size"],
        lm=lm,
        residual_lm_num_layers=ref.get("residual_lm_num_layers", 8 if arch == "voxcpm2" else 6),
        residual_lm_no_rope=bool(ref.get("residual_lm_no_rope", False)),
        encoder=_stack_from_reference(ref["encoder_config"], lm),
        dit=_stack_from_reference(ref["dit_config"], lm),
        rope=rope,
        norm_eps=lm_ref["rms_norm_eps"],
        patch_size=ref.get("patch_size", 4 if arch == "voxcpm2" else 2),
        feat_dim=ref.get("feat_dim", 64),
        fsq_latent_dim=ref.get("scalar_quantization_latent_dim", 512 if arch == "voxcpm2" else 256),
        fsq_scale=ref.get("scalar_quantization_scale", 9),
        use_mup=bool(lm_ref.get("use_mup", True)),
        scale_emb=float(lm_ref["scale_emb"]),
        scale_depth=float(lm_ref["scale_depth"]),
        dim_model_base=int(lm_ref["dim_model_base"]),
        flow=FlowConfig(cfg_rate=float(cfm.get("training_cfg_rate", 0.1))),
        max_length=ref.get("max_length", 8192),
        bos_token_id=lm_ref["bos_token_id"],
        eos_token_id=lm_ref["eos_token_id"],
    )


def to_reference_config(cfg: Any, audio_vae_config: Optional[dict] = None, dtype: str = "bfloat16") -> dict:
    """The reference `config.json` dict for `cfg` (audio_vae_config is passed through)."""
    if cfg.lm.num_query_groups != cfg.encoder.num_query_groups or cfg.lm.num_query_groups != cfg.dit.num_query_groups:
        raise ConfigError(
            "model.encoder/dit.num_query_groups must equal model.lm.num_query_groups "
            "for the reference format (it copies the LM's KV heads)"
        )
    rope_scaling = None
    if cfg.rope.short_factor or cfg.rope.long_factor:
        rope_scaling = {
            "type": "longrope",
            "long_factor": [float(f) for f in (cfg.rope.long_factor or cfg.rope.short_factor)],
            "short_factor": [float(f) for f in (cfg.rope.short_factor or cfg.rope.long_factor)],
            "original_max_position_embeddings": int(cfg.rope.original_max_position_embeddings),
        }
    else:
        head = cfg.lm.head_dim
        rope_scaling = {
            "type": "longrope",
            "long_factor": [1.0] * (head // 2),
            "short_factor": [1.0] * (head // 2),
            "original_max_position_embeddings": int(cfg.rope.original_max_position_embeddings),
        }

    def block(stack: StackConfig) -> dict:
        out = {
            "hidden_dim": stack.hidden_size,
            "ffn_dim": stack.ffn_hidden_size,
            "num_heads": stack.num_attention_heads,
            "num_layers": stack.num_layers,
        }
        if stack.kv_channels is not None:  # the reference schema takes an int or no key
            out["kv_channels"] = stack.kv_channels
        return out

    dit = block(cfg.dit)
    dit["cfm_config"] = {
        "sigma_min": 1e-06,
        "solver": "euler",
        "t_scheduler": "log-norm",
        "training_cfg_rate": float(cfg.flow.cfg_rate),
        "inference_cfg_rate": 2.0,
    }
    ref = {
        "architecture": cfg.architecture,
        "lm_config": {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "hidden_size": cfg.lm.hidden_size,
            "intermediate_size": cfg.lm.ffn_hidden_size,
            "max_position_embeddings": cfg.rope.max_position_embeddings,
            "num_attention_heads": cfg.lm.num_attention_heads,
            "num_hidden_layers": cfg.lm.num_layers,
            "num_key_value_heads": cfg.lm.num_query_groups,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope.theta,
            "rope_scaling": rope_scaling,
            "vocab_size": cfg.vocab_size,
            "use_mup": bool(cfg.use_mup),
            "scale_emb": cfg.scale_emb,
            "dim_model_base": cfg.dim_model_base,
            "scale_depth": cfg.scale_depth,
        },
        "patch_size": cfg.patch_size,
        "feat_dim": cfg.feat_dim,
        "scalar_quantization_latent_dim": cfg.fsq_latent_dim,
        "scalar_quantization_scale": cfg.fsq_scale,
        "residual_lm_num_layers": cfg.residual_lm_num_layers,
        "encoder_config": block(cfg.encoder),
        "dit_config": dit,
        "max_length": cfg.max_length,
        "dtype": dtype,
    }
    if cfg.lm.kv_channels is not None:
        ref["lm_config"]["kv_channels"] = cfg.lm.kv_channels
    if cfg.architecture == "voxcpm2":
        ref["residual_lm_no_rope"] = bool(cfg.residual_lm_no_rope)
    if audio_vae_config is not None:
        ref["audio_vae_config"] = dict(audio_vae_config)
    return ref


def load_model_preset(name_or_path: str, overrides: Optional[List[str]] = None) -> ModelConfig:
    """Load `configs/model/<name>.yaml` (or a YAML path) into the structured schema, validated.

    `overrides` are dotlist entries without the `model.` prefix (e.g. `lm.num_layers=4`).
    """
    from voxcpm_train.config import load_preset

    cfg = load_preset("model", ModelConfig, name_or_path, overrides)
    validate_model_config(cfg)
    return cfg
