"""ModelConfig: presets, one clear error naming the wrong key, Hydra composition, and the conversion
from/to the reference config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from voxcpm_train.config.model import (
    ConfigError,
    ModelConfig,
    from_reference_config,
    load_model_preset,
    to_reference_config,
    validate_model_config,
)

RELEASED = Path("/tmp/ref/voxcpm2_released_config.json")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["voxcpm2_2b", "voxcpm_0_5b", "tiny"])
def test_presets_load_and_validate(name):
    cfg = load_model_preset(name)
    assert isinstance(cfg, ModelConfig)
    validate_model_config(cfg)


def test_voxcpm2_preset_values():
    cfg = load_model_preset("voxcpm2_2b")
    assert (cfg.lm.hidden_size, cfg.lm.ffn_hidden_size, cfg.lm.num_layers) == (2048, 6144, 28)
    assert (cfg.lm.num_attention_heads, cfg.lm.num_query_groups, cfg.lm.head_dim) == (16, 2, 128)
    assert (cfg.encoder.hidden_size, cfg.encoder.head_dim, cfg.dit.num_layers) == (1024, 128, 12)
    assert cfg.residual_lm_num_layers == 8 and cfg.residual_lm_no_rope and not cfg.use_mup
    assert len(cfg.rope.short_factor) == 64 and cfg.rope.short_factor == cfg.rope.long_factor
    v1 = load_model_preset("voxcpm_0_5b")
    assert v1.architecture == "voxcpm" and v1.use_mup and v1.patch_size == 2 and v1.fsq_latent_dim == 256


@pytest.mark.parametrize(
    "override,message",
    [
        ("lm.num_attention_heads=3", "model.lm.num_attention_heads=3 does not divide hidden_size=64"),
        ("lm.num_query_groups=3", "model.lm.num_query_groups=3 does not divide num_attention_heads=4"),
        ("dit.num_layers=0", "model.dit.num_layers=0 must be a positive integer"),
        ("encoder.kv_channels=12", "model.rope.short_factor has 8 factors; model.encoder head dim 12 needs 6"),
        ("architecture=voxcpm3", "model.architecture='voxcpm3' is not one of"),
        ("attention_backend=flash", "model.attention_backend='flash' is not one of"),
        ("pipeline_layers=[1,1]", "model.pipeline_layers=[1, 1] must be non-negative counts summing to"),
        ("flow.cfg_rate=1.5", "model.flow.cfg_rate=1.5 must be in [0, 1)"),
        ("vocab_size=100", "model.vocab_size=100 must exceed 104"),
    ],
)
def test_wrong_value_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_model_preset("tiny", [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["transformer_impl=apex"], "model.transformer_impl='apex' is not one of"),
        (["packed_seq_format=bshd"], "model.packed_seq_format='bshd' is not one of"),
        (["fp8=e5m2"], "model.fp8='e5m2' is not one of null, e4m3, hybrid"),
        (["fp8=hybrid", "fp8_recipe=mxfp8"], "model.fp8_recipe='mxfp8' is not one of"),
        (["fp8=hybrid", "transformer_impl=local"], "model.fp8='hybrid' needs model.transformer_impl=te"),
        (["transformer_impl=te", "packed_seq_format=dense_mask"], "model.transformer_impl=te needs model.packed_seq_format=thd"),
        (["transformer_impl=te", "attention_backend=npu"], "model.attention_backend=npu cannot run in model.transformer_impl=te"),
    ],
)
def test_fast_path_options_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_model_preset("tiny", overrides)
    assert message in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="lm.num_layers"):
        load_model_preset("tiny", ["lm.num_layers=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_model_preset("no_such_preset")


def test_hydra_composes_presets():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from voxcpm_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        composed = compose(overrides=["+model=tiny", "model.lm.num_layers=3"])
    cfg = OmegaConf.to_object(composed.model)
    assert isinstance(cfg, ModelConfig) and cfg.lm.num_layers == 3
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        with pytest.raises(Exception, match="num_layers"):
            compose(overrides=["+model=tiny", "model.lm.num_layers=many"])


@pytest.mark.skipif(not RELEASED.is_file(), reason="released VoxCPM2 config.json not available")
def test_released_config_round_trip():
    released = json.loads(RELEASED.read_text())
    cfg = from_reference_config(released)
    preset = load_model_preset("voxcpm2_2b")
    assert cfg == dataclasses.replace(preset, params_dtype=cfg.params_dtype)
    back = to_reference_config(cfg)
    assert back["lm_config"] == released["lm_config"]
    for key in ("patch_size", "feat_dim", "scalar_quantization_latent_dim", "scalar_quantization_scale",
                "residual_lm_num_layers", "residual_lm_no_rope", "encoder_config", "max_length", "architecture"):
        assert back[key] == released[key], key
    dit = dict(back["dit_config"])
    assert {k: dit[k] for k in ("hidden_dim", "ffn_dim", "num_heads", "num_layers", "kv_channels")} == {
        k: released["dit_config"][k] for k in ("hidden_dim", "ffn_dim", "num_heads", "num_layers", "kv_channels")}


@pytest.mark.parametrize("name", ["tiny", "voxcpm_0_5b"])
def test_reference_config_round_trip_and_schema(name):
    from voxcpm.model.voxcpm2 import VoxCPMConfig

    cfg = load_model_preset(name)
    ref = to_reference_config(cfg)
    VoxCPMConfig.model_validate(ref)  # the reference schema accepts it
    back = from_reference_config(json.loads(json.dumps(ref)))
    same = dataclasses.replace(back, attention_backend=cfg.attention_backend, params_dtype=cfg.params_dtype,
                               pipeline_layers=cfg.pipeline_layers, flow=cfg.flow, lambda_diff=cfg.lambda_diff,
                               lambda_stop=cfg.lambda_stop, init_method_std=cfg.init_method_std)
    if not cfg.rope.short_factor:  # plain RoPE is written as all-one factors
        same = dataclasses.replace(same, rope=cfg.rope)
    assert same == cfg
