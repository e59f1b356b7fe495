"""The Transformer Engine layer spec (`model.transformer_impl=te`) without Transformer Engine.

TE is CUDA-only and not installed here, so its three pieces are replaced by CPU test doubles that keep
what our code relies on: the parameter names, TP layouts and `sharded_state_dict` axes of megatron's
`TELayerNormColumnParallelLinear` (`weight` split on dim 0, `layer_norm_weight` replicated, the RMSNorm
applied to the input before the GEMM) and `TERowParallelLinear` (`weight` split on dim 1), a non-empty
`_extra_state` (TE's FP8 metadata), and TE's fused RoPE contract (fp32 angles [S, 1, 1, d]). Everything
else is ours and real: the spec, the fused-norm key maps (sharded and plain state dicts), the extra-state
handling, LongRoPE's angle table, the THD path. Checked: one-to-one checkpoint keys (names, global shapes,
TP axes) with the local spec; torch_dist checkpoints of either spec load into the other; same losses,
grads and generated latents as the local spec from the same weights. With Transformer Engine installed
(a CUDA machine), `test_real_te_spec_keys` checks the real classes the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from test_model_parity import make_sample, max_rel, pack_row
from voxcpm_train.config.model import ConfigError, load_model_preset


class LayerNormColumnLinearDouble(ColumnParallelLinear):
    """CPU double of megatron's `TELayerNormColumnParallelLinear` (same signature and parameter names)."""

    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias, skip_bias_add,
                 is_expert, skip_weight_param_allocation=False, tp_comm_buffer_name=None, tp_group=None, stride=1):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=gather_output, skip_bias_add=skip_bias_add, is_expert=is_expert,
                         skip_weight_param_allocation=skip_weight_param_allocation,
                         tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group, stride=stride)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        setattr(self.layer_norm_weight, "sequence_parallel", config.sequence_parallel)
        self.eps = config.layernorm_epsilon
        self.loaded_extra_state = "unset"

    def forward(self, x):
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return super().forward((x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.layer_norm_weight)

    def get_extra_state(self):  # TE keeps its FP8 scaling state here
        return torch.tensor([7, 7, 7], dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loaded_extra_state = state


class RowLinearDouble(RowParallelLinear):
    """CPU double of megatron's `TERowParallelLinear`."""


def fused_rope_double(t, freqs):
    """TE's fused RoPE contract: fp32 angles [S, 1, 1, d] (rotate-half), math in fp32, t's dtype out."""
    from voxcpm_train.model.rope import apply_rope_fp32

    assert freqs.dtype == torch.float32 and freqs.shape[1] == freqs.shape[2] == 1
    return apply_rope_fp32(t, torch.stack((freqs.cos(), freqs.sin())))


@pytest.fixture
def te_doubles(monkeypatch):
    from voxcpm_train.model import layer_spec

    doubles = layer_spec.TEModules(LayerNormColumnLinearDouble, RowLinearDouble, fused_rope_double)
    monkeypatch.setattr(layer_spec, "te_modules", lambda: doubles)
    return doubles


def _cfg(impl):
    return dataclasses.replace(load_model_preset("tiny"), transformer_impl=impl)


def _pair(te_doubles):
    from voxcpm_train.model import VoxCPMModel

    torch.manual_seed(0)
    local = VoxCPMModel(_cfg("local")).train()
    te = VoxCPMModel(_cfg("te")).train()
    te.load_state_dict(local.state_dict(), strict=True)
    return local, te


def _sharded_layout(model):
    """{checkpoint key: (global shape, TP axis fragmentation)} and the ShardedObject keys of a model."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    tensors, objects = {}, {}
    for v in nested_values(model.sharded_state_dict()):
        if isinstance(v, ShardedTensor):
            tensors[v.key] = (tuple(v.global_shape), tuple(v.axis_fragmentations), v.dtype)
        elif isinstance(v, ShardedObject):
            objects[v.key] = v.data
    return tensors, objects


def test_te_spec_structure(te_doubles):
    from megatron.core.transformer.identity_op import IdentityOp

    from voxcpm_train.model.attention import SDPAttention
    from voxcpm_train.model.layer_spec import LongRoPESelfAttention, MiniCPMTELayer, minicpm_layer_spec

    spec = minicpm_layer_spec(SDPAttention, causal=True, residual_scale=0.5, impl="te")
    sub = spec.submodules
    assert spec.module is MiniCPMTELayer
    assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp  # fused into the GEMMs
    attn = sub.self_attention
    assert attn.module is LongRoPESelfAttention and attn.params["rope_fusion"] is True
    assert attn.submodules.linear_qkv is LayerNormColumnLinearDouble and attn.submodules.linear_proj is RowLinearDouble
    assert sub.mlp.submodules.linear_fc1 is LayerNormColumnLinearDouble and sub.mlp.submodules.linear_fc2 is RowLinearDouble
    assert sub.self_attn_bda.params == {"scale": 0.5}  # μP residual scale kept
    assert sub.sharded_state_dict_keys_map == {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                                               "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}


def test_te_spec_checkpoint_keys_match_local(megatron_single, te_doubles):
    local, te = _pair(te_doubles)
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in te.named_parameters())
    assert not any("input_layernorm" in n for n, _ in te.named_parameters())
    local_tensors, local_objects = _sharded_layout(local)
    te_tensors, te_objects = _sharded_layout(te)
    assert te_tensors == local_tensors  # same keys, global shapes, TP axes, dtypes
    assert te_objects.keys() == local_objects.keys() and len(te_objects) > 0
    assert all(v is None for v in te_objects.values())  # TE extra state is not written
    # plain state dicts (the convert table's names) agree too, and round-trip
    assert te.state_dict().keys() == local.state_dict().keys()
    back = type(local)(_cfg("local"))
    back.load_state_dict(te.state_dict(), strict=True)
    for (n, a), (_, b) in zip(sorted(back.state_dict().items()), sorted(local.state_dict().items())):
        if torch.is_tensor(a):
            assert torch.equal(a, b), n


def test_torch_dist_checkpoints_load_across_specs(megatron_single, te_doubles, tmp_path):
    from megatron.core import dist_checkpointing

    from voxcpm_train.parallel import safe_dcp_reading

    local, te = _pair(te_doubles)
    (tmp_path / "te").mkdir()
    (tmp_path / "local").mkdir()
    with torch.no_grad():  # distinct values everywhere, norms included
        for p in te.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    dist_checkpointing.save(te.sharded_state_dict(), str(tmp_path / "te"))
    with safe_dcp_reading():  # the project's loading path: no unpickling of code
        loaded = dist_checkpointing.load(local.sharded_state_dict(), str(tmp_path / "te"))
    local.load_state_dict(loaded, strict=True)
    te_sd = te.state_dict()
    for name, value in local.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, te_sd[name]), name
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path / "local"))
    fresh = type(te)(_cfg("te"))
    with safe_dcp_reading():
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "local")), strict=True)
    for name, value in fresh.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, te_sd[name]), name
    qkv = fresh.base_lm.layers[0].self_attention.linear_qkv
    assert qkv.loaded_extra_state is None


def test_te_spec_computes_what_local_does(megatron_single, te_doubles):
    local, te = _pair(te_doubles)
    gen = torch.Generator().manual_seed(4)
    rows = [pack_row([make_sample("clone", 4, 64, gen), make_sample("tts", 4, 64, gen)], 30),
            pack_row([make_sample("tts", 4, 64, gen)], 30)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["row_seeds"] = torch.tensor([1, 2])
    results = []
    for model in (local, te):
        model.zero_grad(set_to_none=True)
        out = model(batch)
        (out["diff_sum"] + out["stop_sum"]).backward()
        results.append((out, {n: p.grad for n, p in model.state_dict(keep_vars=True).items()
                                  if not n.endswith("_extra_state")}))
    (lo, lg), (to, tg) = results
    for key in ("diff_sum", "stop_sum"):
        assert abs(float(to[key]) / float(lo[key]) - 1) < 1e-6, key
    assert lg.keys() == tg.keys()
    for name in lg:
        if lg[name] is not None and lg[name].abs().max() > 0:
            assert max_rel(tg[name], lg[name]) < 1e-5, name


def test_te_spec_sampler(megatron_single, te_doubles):
    from voxcpm_train.generation.sampler import GenerationConfig, generate_latents

    local, te = _pair(te_doubles)
    gen = GenerationConfig(max_patches=3, min_patches=0, timesteps=3, seed=1)
    a = generate_latents(local.eval(), [5, 6, 7], gen)
    b = generate_latents(te.eval(), [5, 6, 7], gen)
    assert a.shape == b.shape and a.shape[0] > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_te_unavailable_is_a_config_error(megatron_single):
    from voxcpm_train.model import VoxCPMModel

    if importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available():
        pytest.skip("Transformer Engine is available here")
    with pytest.raises(ConfigError, match="model.transformer_impl=te needs Transformer Engine"):
        VoxCPMModel(_cfg("te"))
    with pytest.raises(ConfigError, match="model.fp8='hybrid' needs Transformer Engine"):
        VoxCPMModel(dataclasses.replace(_cfg("te"), fp8="hybrid"))
    with pytest.raises(ConfigError, match="model.attention_backend=te: Transformer Engine is not installed"):
        VoxCPMModel(dataclasses.replace(_cfg("local"), attention_backend="te"))


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None or not torch.cuda.is_available(),
                    reason="needs Transformer Engine on a CUDA device")
def test_real_te_spec_keys(megatron_single):
    from voxcpm_train.model import VoxCPMModel

    torch.manual_seed(0)
    local = VoxCPMModel(_cfg("local"), use_cpu_initialization=False).cuda()
    te = VoxCPMModel(_cfg("te"), use_cpu_initialization=False).cuda()
    te.load_state_dict(local.state_dict(), strict=True)
    assert _sharded_layout(te)[0] == _sharded_layout(local)[0]
