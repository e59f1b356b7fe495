"""The declarative table reference <-> ours (`voxcpm_train.convert.mapping`), as pure functions on
state dicts: coverage of the real reference model and of our model, megatron's TP layouts spelled
out index by index, TP x PP round trips, stage placement, and the errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from voxcpm_train.config.model import load_model_preset
from voxcpm_train.convert.mapping import (
    ConversionError,
    entries,
    ours_to_reference,
    reference_keys,
    reference_to_ours,
)


@pytest.fixture(scope="module")
def cfg():
    return load_model_preset("tiny")


@pytest.fixture(scope="module")
def ref_sd(cfg):
    """Weights of a random reference `VoxCPM2Model` of the tiny preset (built by `voxcpm` itself)."""
    from voxcpm_train.convert.tiny import random_reference_model

    model = random_reference_model(cfg, seed=1)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("audio_vae.")}


def shards_of(ref_sd, cfg, tp, pp):
    return [[reference_to_ours(ref_sd, cfg, tp, t, pp, p) for t in range(tp)] for p in range(pp)]


def test_table_covers_the_reference_model_exactly(cfg, ref_sd):
    keys = reference_keys(cfg)
    assert len(keys) == len(set(keys)), "a reference name appears in two rows"
    assert set(keys) == set(ref_sd)


def test_table_covers_our_model_on_every_stage(megatron_single, cfg):
    """Our VoxCPMModel's state dict on each stage (PP = 1 and 2, uneven cut too) holds exactly the
    table's names for that stage, with the shapes the conversion produces."""
    from voxcpm_train.convert.tiny import random_reference_model
    from voxcpm_train.model import VoxCPMModel

    ref = {k: v for k, v in random_reference_model(cfg).state_dict().items() if not k.startswith("audio_vae.")}
    for layers in (None, [2, 2], [1, 3], [3, 1]):
        pp = 1 if layers is None else 2
        c = dataclasses.replace(cfg, pipeline_layers=layers)
        for rank in range(pp):
            model = VoxCPMModel(c, rank == 0, rank == pp - 1, pp_rank=rank, pp_size=pp)
            own = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
            ours = reference_to_ours(ref, c, 1, 0, pp, rank)
            assert set(ours) == set(own), (layers, rank, set(ours) ^ set(own))
            for k, v in own.items():
                assert ours[k].shape == v.shape, (k, ours[k].shape, v.shape)


@pytest.mark.parametrize(
    "tp,pp,layers",
    [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (2, 2, [1, 3]), (1, 4, [1, 1, 1, 1]), (2, 4, [2, 0, 1, 1])],
)
def test_round_trip_is_bit_exact(cfg, ref_sd, tp, pp, layers):
    c = dataclasses.replace(cfg, pipeline_layers=layers)
    shards = shards_of(ref_sd, c, tp, pp)
    total = sum(len(sd) for stage in shards for sd in stage) // tp
    assert total == len(entries(c, pp)) == len(entries(cfg, 1))
    back = ours_to_reference(shards, c)
    assert set(back) == set(ref_sd)
    for k, v in ref_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_qkv_is_interleaved_per_query_group_and_split_by_groups(cfg, ref_sd):
    """tiny lm: 4 heads, 2 query groups, head dim 16. TP = 2: rank r holds group r as
    [q heads 2r, 2r+1; k_r; v_r] rows, megatron's layout."""
    d, heads, groups, tp = cfg.lm.head_dim, cfg.lm.num_attention_heads, cfg.lm.num_query_groups, 2
    q = ref_sd["base_lm.layers.1.self_attn.q_proj.weight"]
    k = ref_sd["base_lm.layers.1.self_attn.k_proj.weight"]
    v = ref_sd["base_lm.layers.1.self_attn.v_proj.weight"]
    per_group = heads // groups
    full = reference_to_ours(ref_sd, cfg)["base_lm.layers.1.self_attention.linear_qkv.weight"]
    expected_rows = []
    for g in range(groups):
        for h in range(g * per_group, (g + 1) * per_group):
            expected_rows.append(q[h * d:(h + 1) * d])
        expected_rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    assert torch.equal(full, torch.cat(expected_rows))
    rows_per_group = (per_group + 2) * d
    for rank in range(tp):
        local = reference_to_ours(ref_sd, cfg, tp, rank)["base_lm.layers.1.self_attention.linear_qkv.weight"]
        g_per_rank = groups // tp
        assert torch.equal(local, full[rank * g_per_rank * rows_per_group:(rank + 1) * g_per_rank * rows_per_group])


def test_fc1_is_gate_then_up_split_per_rank(cfg, ref_sd):
    gate = ref_sd["residual_lm.layers.0.mlp.gate_proj.weight"]
    up = ref_sd["residual_lm.layers.0.mlp.up_proj.weight"]
    name = "residual_lm.layers.0.mlp.linear_fc1.weight"
    assert torch.equal(reference_to_ours(ref_sd, cfg)[name], torch.cat([gate, up]))
    ffn = cfg.lm.ffn_hidden_size
    for rank in range(2):
        local = reference_to_ours(ref_sd, cfg, 2, rank)[name]
        half = slice(rank * ffn // 2, (rank + 1) * ffn // 2)
        assert torch.equal(local, torch.cat([gate[half], up[half]]))


def test_row_vocab_and_replicated_splits(cfg, ref_sd):
    r1 = reference_to_ours(ref_sd, cfg, 2, 1)
    o = ref_sd["feat_decoder.estimator.decoder.layers.1.self_attn.o_proj.weight"]  # [H, heads*d]
    assert torch.equal(r1["feat_decoder.estimator.decoder.layers.1.self_attention.linear_proj.weight"], o[:, o.shape[1] // 2:])
    down = ref_sd["base_lm.layers.0.mlp.down_proj.weight"]
    assert torch.equal(r1["base_lm.layers.0.mlp.linear_fc2.weight"], down[:, down.shape[1] // 2:])
    emb = ref_sd["base_lm.embed_tokens.weight"]
    assert torch.equal(r1["text_embedding.weight"], emb[emb.shape[0] // 2:])
    for name in ("base_lm.norm.weight", "fusion_concat_proj.weight", "feat_encoder.special_token", "stop_head.weight"):
        assert torch.equal(r1[name], ref_sd[name])


def test_stage_placement_follows_the_model_cut(cfg, ref_sd):
    """TSLM final norm, FSQ and fusion go to the stage holding the last TSLM layer; stage-local
    layer numbering restarts at 0 on each stage."""
    c = dataclasses.replace(cfg, pipeline_layers=[1, 3])  # stage 0: lm 0; stage 1: lm 1, res 0, res 1
    s0, s1 = (reference_to_ours(ref_sd, c, 1, 0, 2, r) for r in range(2))
    assert "base_lm.layers.0.input_layernorm.weight" in s0 and "base_lm.layers.1.input_layernorm.weight" not in s0
    assert torch.equal(s1["base_lm.layers.0.input_layernorm.weight"], ref_sd["base_lm.layers.1.input_layernorm.weight"])
    for name in ("base_lm.norm.weight", "fsq_layer.in_proj.weight", "fusion_concat_proj.bias"):
        assert name in s1 and name not in s0
    for name in ("text_embedding.weight", "feat_encoder.encoder.norm.weight", "enc_to_lm_proj.weight"):
        assert name in s0 and name not in s1
    c = dataclasses.replace(cfg, pipeline_layers=[3, 1])  # stage 0: lm 0, lm 1, res 0; stage 1: res 1
    s0, s1 = (reference_to_ours(ref_sd, c, 1, 0, 2, r) for r in range(2))
    assert "fsq_layer.out_proj.bias" in s0 and "residual_lm.layers.0.pre_mlp_layernorm.weight" in s0
    assert torch.equal(
        s1["residual_lm.layers.0.self_attention.linear_proj.weight"], ref_sd["residual_lm.layers.1.self_attn.o_proj.weight"]
    )
    assert "residual_lm.norm.weight" in s1 and "stop_proj.weight" in s1


def test_voxcpm_v1_table_has_no_fusion_projection(cfg):
    v1 = dataclasses.replace(cfg, architecture="voxcpm")
    assert not any(k.startswith("fusion_concat_proj") for k in reference_keys(v1))
    assert len(reference_keys(v1)) == len(reference_keys(cfg)) - 2


# ------------------------------------------------------------------------------------------ errors


def test_missing_and_unexpected_reference_keys_are_listed(cfg, ref_sd):
    sd = dict(ref_sd)
    del sd["base_lm.layers.1.mlp.up_proj.weight"]
    sd["base_lm.layers.1.mlp.extra_proj.weight"] = torch.zeros(1)
    sd["audio_vae.encoder.block.0.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as err:
        reference_to_ours(sd, cfg)
    msg = str(err.value)
    assert "missing keys (1): base_lm.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (2): audio_vae.encoder.block.0.weight, base_lm.layers.1.mlp.extra_proj.weight" in msg


def test_qkv_shape_mismatch_names_both_shapes(cfg, ref_sd):
    sd = dict(ref_sd)
    sd["residual_lm.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, cfg.lm.hidden_size)
    with pytest.raises(ConversionError, match=r"k_proj.weight: shape \(48, 64\).*expected \(32, 64\)"):
        reference_to_ours(sd, cfg)


def test_unsplittable_tp_is_an_error(cfg, ref_sd):
    with pytest.raises(ConversionError, match="query groups cannot be split over tp=4"):
        reference_to_ours(ref_sd, cfg, tp_size=4, tp_rank=0)


def test_ours_with_leftover_or_missing_keys_is_an_error(cfg, ref_sd):
    shards = shards_of(ref_sd, cfg, 2, 2)
    shards[1][0]["residual_lm.layers.0.lora_A.weight"] = torch.zeros(1)
    del shards[0][1]["base_lm.layers.0.self_attention.linear_qkv.weight"]
    with pytest.raises(ConversionError, match=r"pp_rank=0, tp_rank=1.*\n  missing keys \(1\): base_lm.layers.0.self_attention.linear_qkv.weight"):
        ours_to_reference(shards, cfg)
    shards = shards_of(ref_sd, cfg, 2, 2)
    shards[1][0]["residual_lm.layers.0.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"pp_rank=1, tp_rank=0.*\n  unexpected keys \(1\): residual_lm.layers.0.lora_A.weight"):
        ours_to_reference(shards, cfg)


def test_diverged_replicated_tensor_is_an_error(cfg, ref_sd):
    shards = shards_of(ref_sd, cfg, 2, 1)
    shards[0][1]["stop_proj.bias"] = shards[0][1]["stop_proj.bias"] + 1e-7
    with pytest.raises(ConversionError, match="stop_proj.bias .* replicated but tp_rank 1 differs"):
        ours_to_reference(shards, cfg)


def test_table_covers_the_released_2b_model():
    """The released VoxCPM2 config.json, built by the reference on the meta device: the table names
    exactly its 577 non-VAE parameters."""
    from pathlib import Path

    from voxcpm.model.voxcpm2 import VoxCPM2Model, VoxCPMConfig
    from voxcpm.modules.audiovae import AudioVAEConfigV2, AudioVAEV2

    from voxcpm_train.config.model import from_reference_config
    from voxcpm_train.convert.tiny import make_tokenizer

    path = Path(__file__).resolve().parents[1] / "configs" / "model" / "voxcpm2_2b.yaml"
    cfg = load_model_preset(str(path))
    from voxcpm_train.convert.folder import export_reference_config

    ref_json = export_reference_config(cfg, {"device": "cpu"})
    with torch.device("meta"):
        model = VoxCPM2Model(VoxCPMConfig.model_validate(ref_json), make_tokenizer(8), AudioVAEV2(AudioVAEConfigV2()), device="cpu")
    names = {k for k in model.state_dict() if not k.startswith("audio_vae.")}
    assert len(names) == 577
    assert set(reference_keys(cfg)) == names
    assert from_reference_config(ref_json).lm == cfg.lm
