"""Parameter counts on the meta device: VoxCPM2-2B per component exactly as published (DESIGN §3),
and the `voxcpm-model info` CLI."""

from __future__ import annotations

import json


from voxcpm_train.config.model import load_model_preset

VOXCPM2_COUNTS = {
    "base_lm": 1_471_744_000,
    "residual_lm": 377_522_176,
    "feat_encoder": 207_711_232,
    "feat_decoder": 212_040_768,
    "fsq_layer": 2_099_712,
    "enc_to_lm_proj": 2_099_200,
    "lm_to_dit_proj": 2_098_176,
    "res_to_dit_proj": 2_098_176,
    "fusion_concat_proj": 8_390_656,
    "stop_proj": 4_196_352,
    "stop_head": 4_096,
    "total": 2_290_004_544,
}


def test_voxcpm2_counts_on_meta(megatron_single):
    from voxcpm_train.model.params import meta_model_parameter_counts

    assert meta_model_parameter_counts(load_model_preset("voxcpm2_2b")) == VOXCPM2_COUNTS


def test_tiny_counts_match_reference_module_tree(megatron_single):
    """Our per-component counts equal the reference model's own module tree (tiny, both architectures)."""
    import dataclasses

    from test_model_parity import build_reference
    from voxcpm_train.model.params import COMPONENTS, meta_model_parameter_counts

    for changes in ({}, {"architecture": "voxcpm", "patch_size": 2}):
        cfg = dataclasses.replace(load_model_preset("tiny"), **changes)
        ref = build_reference(cfg)
        expected = {c: sum(p.numel() for p in getattr(ref, c).parameters()) if hasattr(ref, c) else 0 for c in COMPONENTS}
        expected["total"] = sum(p.numel() for p in ref.parameters())
        assert meta_model_parameter_counts(cfg) == expected


def test_cli_info_json(megatron_single, capsys):
    from voxcpm_train.model.cli import main

    assert main(["info", "--model", "voxcpm2_2b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == VOXCPM2_COUNTS


def test_cli_bad_value_names_key(capsys):
    from voxcpm_train.model.cli import main

    assert main(["info", "--model", "tiny", "lm.num_attention_heads=3"]) == 2
    assert "model.lm.num_attention_heads=3 does not divide hidden_size=64" in capsys.readouterr().err
