"""Pipeline stages in one process: the stage layout, PP stages chained by hand through
`set_input_tensor` (the [2T, B, H] inter-stage tensor) against the single-stage model with the same
weights, and global layer numbering in `sharded_state_dict`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_model_parity import make_sample, max_rel, pack_row
from voxcpm_train.config.model import ConfigError, load_model_preset


def test_stage_layers_split():
    from voxcpm_train.model.pipeline import stage_layer_counts, stage_layers

    cfg = load_model_preset("voxcpm2_2b")  # 28 TSLM + 8 RALM = 36 layers
    assert stage_layer_counts(cfg, 4) == [9, 9, 9, 9]
    assert stage_layer_counts(cfg, 5) == [8, 7, 7, 7, 7]
    s = [stage_layers(cfg, 4, r) for r in range(4)]
    assert [(x.base_first, x.base_count, x.residual_first, x.residual_count) for x in s] == [
        (0, 9, 0, 0), (9, 9, 0, 0), (18, 9, 0, 0), (27, 1, 0, 8)]
    assert [x.holds_last_base_layer for x in s] == [False, False, False, True]
    s = [stage_layers(cfg, 2, r, override=[28, 8]) for r in range(2)]
    assert s[0].holds_last_base_layer and s[0].residual_count == 0 and s[1].base_count == 0
    with pytest.raises(ConfigError, match=r"model.pipeline_layers=\[10, 10\]"):
        stage_layer_counts(cfg, 2, override=[10, 10])


def make_batch(cfg):
    gen = torch.Generator().manual_seed(21)
    P, D = cfg.patch_size, cfg.feat_dim
    rows = [
        pack_row([make_sample("tts", P, D, gen), make_sample("clone", P, D, gen)], 32),
        pack_row([make_sample("clone", P, D, gen)], 32),
    ]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["row_seeds"] = torch.tensor([5, 6])
    return batch


def run_stages(stages, batch):
    """Forward/backward through the stages as the schedule would; losses and grads by name."""
    outputs, inputs = [], []
    for stage in stages:
        stage.zero_grad(set_to_none=True)
        if inputs:
            stage.set_input_tensor(inputs[-1])
        out = stage(batch)
        outputs.append(out)
        if not stage.post_process:
            inputs.append(out.detach().requires_grad_())
    losses = outputs[-1]
    (losses["diff_sum"] + losses["stop_sum"]).backward()
    for out, inp in reversed(list(zip(outputs[:-1], inputs))):
        out.backward(inp.grad)
    grads = [{n: p.grad for n, p in s.named_parameters()} for s in stages]
    return losses, grads


@pytest.mark.parametrize(
    "pp_size,split",
    [(2, None), (3, [1, 2, 1]), (2, [2, 2]), (2, [0, 4]), (2, [4, 0])],
    ids=["pp2", "pp3-split-at-fsq", "pp2-fsq-end", "pp2-first-stage-no-layers", "pp2-last-stage-no-layers"],
)
def test_pipeline_stages_match_single_stage(megatron_single, pp_size, split):
    from voxcpm_train.convert.mapping import ours_to_reference, reference_to_ours
    from voxcpm_train.model import VoxCPMModel

    single = load_model_preset("tiny")
    cfg = dataclasses.replace(single, pipeline_layers=split)
    torch.manual_seed(0)
    full = VoxCPMModel(single, pp_rank=0, pp_size=1).train()
    ref_sd = ours_to_reference([[full.state_dict()]], single)
    stages = []
    for rank in range(pp_size):
        stage = VoxCPMModel(cfg, pre_process=rank == 0, post_process=rank == pp_size - 1, pp_rank=rank, pp_size=pp_size)
        stage.load_state_dict(reference_to_ours(ref_sd, cfg, pp_size=pp_size, pp_rank=rank), strict=True)
        stages.append(stage.train())
    batch = make_batch(cfg)
    full_losses, (full_grads,) = run_stages([full], batch)
    pp_losses, pp_grads = run_stages(stages, batch)
    for key in ("diff_sum", "stop_sum", "num_loss_positions"):
        assert torch.equal(full_losses[key], pp_losses[key]), key

    # Map every stage gradient back to the single-stage names through the reference names.
    as_ref = ours_to_reference([[g] for g in pp_grads], cfg)
    expected = ours_to_reference([[full_grads]], single)
    assert set(as_ref) == set(expected)
    worst = max(max_rel(as_ref[k], expected[k]) for k in expected if expected[k].abs().max() > 0)
    # Not bitwise: feat_embed's two gradient paths (x and the side rows) accumulate in another order.
    print(f"\nPP={pp_size} split={split}: losses bitwise equal; worst grad rel err {worst:.2e}")
    assert worst < 1e-6, worst


def test_sharded_state_dict_numbers_layers_globally(megatron_single):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from voxcpm_train.model import VoxCPMModel

    single = load_model_preset("tiny")
    cfg = dataclasses.replace(single, pipeline_layers=[1, 2, 1])

    def shards(model):
        out = set()
        for key, value in model.sharded_state_dict().items():
            if isinstance(value, ShardedTensor):
                out.add((value.key, value.global_offset, value.global_shape))
        return out

    with torch.device("meta"):
        full = shards(VoxCPMModel(single, pp_rank=0, pp_size=1))
        staged = [
            shards(VoxCPMModel(cfg, pre_process=r == 0, post_process=r == 2, pp_rank=r, pp_size=3)) for r in range(3)
        ]
    assert set().union(*staged) == full
    assert sum(len(s) for s in staged) == len(full)  # every shard on exactly one stage
    qkv = sorted(o for k, o, _ in full if k == "base_lm.layers.self_attention.linear_qkv.weight")
    assert [o[0] for o in qkv] == [0, 1]
    res_on_stage1 = [o for k, o, _ in staged[1] if k == "residual_lm.layers.self_attention.linear_qkv.weight"]
    assert [o[0] for o in res_on_stage1] == [0]
    res_on_stage2 = [o for k, o, _ in staged[2] if k == "residual_lm.layers.self_attention.linear_qkv.weight"]
    assert [o[0] for o in res_on_stage2] == [1]
