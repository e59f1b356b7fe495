"""LoRA adapters and module freezing in one process: the adapter math on every linear kind, names
and sharded keys, a norm-fused (Transformer Engine style) linear, frozen parameters through megatron's
DDP and (distributed) optimizer, base checkpoints loading into adapted models, and the `peft` config."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from test_model_parity import make_sample, pack_row, stack_rows
from test_train_config import _compose

ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _peft(method="lora", freeze=(), **lora):
    from voxcpm_train.config.peft import LoraConfig, PeftConfig

    return PeftConfig(method=method, freeze=list(freeze), lora=LoraConfig(**lora))


def _model(seed=0):
    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.model import VoxCPMModel

    torch.manual_seed(seed)
    return VoxCPMModel(load_model_preset("tiny"))


def _batch(seed=3, rows=("clone", "tts")):
    gen = torch.Generator().manual_seed(seed)
    return stack_rows([pack_row([make_sample(kind, 4, 64, gen)], 16) for kind in rows])


def test_adapter_math_names_and_identity_at_init(megatron_single):
    """Every linear kind computes base(x) + (alpha/r)·B(A(x)); B = 0 at init leaves the model
    unchanged bit for bit; the base keeps its state-dict and checkpoint names; merged weights agree."""
    from voxcpm_train.model.lora import apply_peft, lora_modules, merged_state_dict

    plain, model = _model(), _model()
    summary = apply_peft(model, _peft(base_lm=ALL, feat_decoder=ALL, projections=["enc_to_lm_proj"], alpha=4.0), seed=1)
    assert len(summary.adapted) == 2 * 4 + 2 * 2 + 2 * 4 + 1
    assert set(plain.state_dict()) <= set(model.state_dict())
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra == {f"{n}.lora_{x}" for n in summary.adapted for x in "AB"}
    sharded = model.sharded_state_dict()
    assert {v.key for k, v in sharded.items() if k in plain.state_dict() and hasattr(v, "key")} == \
        {v.key for k, v in plain.sharded_state_dict().items() if hasattr(v, "key")}
    torch.manual_seed(0)
    batch = _batch()
    model.train(), plain.train()
    with torch.no_grad():
        a, b = model(batch), plain(batch)
    assert all(torch.equal(a[k], b[k]) for k in a)                  # B = 0: exactly the base model

    gen = torch.Generator().manual_seed(5)
    kinds = {}
    for name, module in lora_modules(model):
        module.lora_B.data.copy_(torch.randn(module.lora_B.shape, generator=gen))
        kinds.setdefault(module.lora_mode, name)
        x = torch.randn(3, 2, module.weight.shape[1], generator=gen)
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        want = F.linear(x, module.weight, getattr(module, "bias", None)) + 0.5 * F.linear(F.linear(x, module.lora_A), module.lora_B)
        assert torch.allclose(out, want, atol=1e-5), name
        assert torch.allclose(out, F.linear(x, module.lora_merged_weight(), getattr(module, "bias", None)), atol=1e-5)
    assert set(kinds) == {"column", "row", "replicated"}
    merged = plain
    merged.load_state_dict(merged_state_dict(model))
    model.eval(), merged.eval()
    torch.manual_seed(0)
    a = model(batch)
    torch.manual_seed(0)
    b = merged(batch)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5) for k in a)


def test_adapter_init_matches_reference_convention(megatron_single):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's / the reference's kaiming_uniform(a=sqrt(5))), B = 0,
    scaling alpha / r; the draw depends on (seed, name) only."""
    from voxcpm_train.model.lora import apply_peft, lora_modules

    m1, m2, m3 = _model(), _model(seed=9), _model()
    for m, seed in ((m1, 1), (m2, 1), (m3, 2)):
        apply_peft(m, _peft(rank=4, alpha=8.0, ranks={"feat_decoder": 2}), seed=seed)
    mods2, mods3 = dict(lora_modules(m2)), dict(lora_modules(m3))
    for name, module in lora_modules(m1):
        fan_in = module.lora_A.shape[1]
        assert module.lora_A.abs().max() <= 1 / fan_in ** 0.5 and module.lora_A.std() > 0.3 / fan_in ** 0.5
        assert torch.equal(module.lora_B, torch.zeros_like(module.lora_B))
        rank = 2 if name.startswith("feat_decoder") else 4
        assert module.lora_A.shape[0] == rank and module.lora_scaling == 8.0 / rank
        assert torch.equal(module.lora_A, mods2[name].lora_A)           # other base init, same adapters
        assert not torch.equal(module.lora_A, mods3[name].lora_A)       # other seed


class NormFusedLinear(torch.nn.Module):
    """Stand-in with Transformer Engine's LayerNormColumnParallelLinear interface (TE is CUDA-only):
    RMSNorm with its own `layer_norm_weight`, then the GEMM; `forward(x) -> (out, None)`."""

    parallel_mode = "column"
    normalization = "RMSNorm"
    sequence_parallel = False

    def __init__(self, hidden, out, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.layer_norm_weight = torch.nn.Parameter(torch.rand(hidden) + 0.5)
        self.weight = torch.nn.Parameter(torch.randn(out, hidden) * 0.1)

    def normed(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.layer_norm_weight

    def forward(self, x):
        return F.linear(self.normed(x), self.weight), None


def test_norm_fused_linear_adapter_sees_the_normalized_input(megatron_single):
    from voxcpm_train.model.lora import add_lora

    torch.manual_seed(0)
    layer = NormFusedLinear(16, 24)
    add_lora(layer, rank=4, alpha=8.0, key="fused", seed=0)
    layer.lora_B.data.normal_()
    x = torch.randn(5, 2, 16) * 3
    out, bias = layer(x)
    n = layer.normed(x)
    assert bias is None
    assert torch.allclose(out, F.linear(n, layer.weight) + 2.0 * F.linear(F.linear(n, layer.lora_A), layer.lora_B), atol=1e-5)
    assert torch.allclose(out, F.linear(n, layer.lora_merged_weight()), atol=1e-5)   # merge is exact too
    layer.normalization = "Mystery"
    with pytest.raises(Exception, match="cannot recompute its fused norm"):
        layer(x)


def _train(job, steps=2):
    from voxcpm_train.platform import current_platform
    from voxcpm_train.parallel import train_step
    from voxcpm_train.training.build import build_model_and_optimizer
    from voxcpm_train.training.curriculum import StageStart, build_scheduler
    from voxcpm_train.training.forward import make_forward_step

    chunks, opt = build_model_and_optimizer(job, current_platform())
    sched = build_scheduler(opt, job, StageStart("pretrain", 0, 0))
    before = {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}
    fwd = make_forward_step(job.model, "cpu")
    for step in range(steps):
        mbs = [_batch(seed=10 * step + i) for i in range(2)]
        res = train_step(fwd, iter(mbs), chunks, opt, sched, num_microbatches=2, seq_length=32,
                         micro_batch_size=2, increment=4)
        assert not res.skipped and res.grad_norm > 0
    after = dict(chunks[0].module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    return chunks, opt, changed


@pytest.mark.parametrize("dist_opt", [True, False], ids=["distributed-optimizer", "local-optimizer"])
def test_frozen_base_gets_no_grads_or_optimizer_state(megatron_single, dist_opt):
    """peft=lora through megatron DDP + get_megatron_optimizer: only the adapters are in the grad
    buffers and the optimizer, only they change over Adam steps; the frozen base stays bit-identical."""
    from voxcpm_train.parallel.optim import inner_optimizers

    job = _compose("peft=lora", "stage.lr_warmup_steps=0", f"parallel.use_distributed_optimizer={str(dist_opt).lower()}",
                   "peft.lora.projections=[fusion_concat_proj]")
    chunks, opt, changed = _train(job)
    named = dict(chunks[0].module.named_parameters())
    adapters = {n for n in named if ".lora_" in n}
    assert adapters and all(named[n].requires_grad == (n in adapters) for n in named)
    assert changed == {n for n in adapters if n.endswith(".lora_B")} | {n for n in adapters if n.endswith(".lora_A")}
    assert sum(b.numel_unpadded for b in chunks[0].buffers) == sum(named[n].numel() for n in adapters)
    (inner,) = inner_optimizers(opt)
    in_opt = {id(p) for g in inner.param_groups for p in g["params"]} if not dist_opt else \
        {id(p) for p in inner.model_param_group_index_map}
    model_ids = {id(named[n]): n for n in named}
    if dist_opt:
        assert {model_ids[i] for i in in_opt} == adapters
    else:   # fp32 optimizer: the model params themselves
        assert {model_ids[i] for i in in_opt if i in model_ids} == adapters


def test_freeze_without_lora(megatron_single):
    """peft.freeze=[feat_encoder, base_lm.layers.0]: those parameters stay put, everything else trains."""
    job = _compose("peft.freeze=[feat_encoder,base_lm.layers.0]", "stage.lr_warmup_steps=0")
    chunks, _, changed = _train(job, steps=1)
    named = dict(chunks[0].module.named_parameters())
    frozen = {n for n in named if n.startswith(("feat_encoder.", "base_lm.layers.0."))}
    assert frozen and all(not named[n].requires_grad for n in frozen)
    assert changed == {n for n in named if named[n].requires_grad} == set(named) - frozen


@pytest.mark.parametrize("override,message", [
    ("peft.freeze=[feat_encodr]", "peft.freeze: feat_encodr"),
    ("peft.lora.projections=[stop_proj]", "peft.lora.projections"),
])
def test_peft_config_errors_at_build(megatron_single, override, message):
    from voxcpm_train.config.job import validate_job_config
    from voxcpm_train.config.model import ConfigError
    from voxcpm_train.platform import current_platform
    from voxcpm_train.training.build import build_model_and_optimizer

    job = _compose("peft=lora", override)
    with pytest.raises(ConfigError, match=message):
        validate_job_config(job)
        build_model_and_optimizer(job, current_platform())


@pytest.mark.parametrize("override,key", [
    ("peft.lora.base_lm=[q_proj]", "peft.lora.base_lm"),
    ("+peft.lora.ranks.stop_head=4", "peft.lora.ranks.stop_head"),
    ("peft.lora.rank=0", "peft.lora.rank"),
    ("peft.method=qlora", "peft.method"),
])
def test_peft_validation_names_the_key(override, key):
    from voxcpm_train.config.job import validate_job_config
    from voxcpm_train.config.model import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_job_config(_compose("peft=lora", override))


def test_peft_presets_compose():
    none, lora = _compose(), _compose("peft=lora")
    assert none.peft.method == "none" and not none.peft.freeze
    assert lora.peft.method == "lora" and lora.peft.lora.rank == 8 and lora.peft.lora.alpha == 16.0
    assert lora.peft.lora.base_lm == lora.peft.lora.feat_decoder == ["linear_qkv", "linear_proj"]
    with pytest.raises(Exception, match="bogus"):
        _compose("peft=lora", "peft.lora.bogus=1")


def test_cpu_offload_errors(megatron_single):
    """optim.cpu_offload: megatron's HybridDeviceOptimizer; where 0.16.1 cannot do it, one error."""
    from voxcpm_train.config.model import ConfigError
    from voxcpm_train.platform.core import Platform
    from voxcpm_train.training.build import cpu_offload_options

    job = _compose("optim.cpu_offload=true")
    cpu = Platform("cpu", "gloo", 0)
    cuda = Platform("cuda", "nccl", 0)
    with pytest.raises(ConfigError, match="needs an accelerator"):
        cpu_offload_options(job, cpu)
    with pytest.raises(ConfigError, match="use_distributed_optimizer"):
        cpu_offload_options(_compose("optim.cpu_offload=true", "parallel.use_distributed_optimizer=false"), cuda)
    with pytest.raises(ConfigError, match="offload_fraction"):
        cpu_offload_options(_compose("optim.cpu_offload=true", "optim.offload_fraction=0"), cuda)
    try:
        import transformer_engine  # noqa: F401
        opts = cpu_offload_options(job, cuda)
        assert opts["optimizer_cpu_offload"] and opts["use_precision_aware_optimizer"]
    except ImportError:
        with pytest.raises(ConfigError, match="Transformer Engine"):
            cpu_offload_options(job, cuda)
    assert cpu_offload_options(_compose(), cpu) == {}


def test_base_checkpoint_into_lora_model_and_changed_targets(megatron_single, tmp_path):
    """A checkpoint without adapters loads into an adapted model (adapters stay as drawn, listed in
    `missing_optional`); one holding other adapters than the model's is an error."""
    from voxcpm_train.model.lora import apply_peft, lora_state_dict
    from voxcpm_train.parallel.checkpoint import load_checkpoint, save_checkpoint

    base = _model(seed=1)
    save_checkpoint(tmp_path / "base", [base])
    model = _model(seed=2)
    apply_peft(model, _peft(), seed=4)
    drawn = {k: v.clone() for k, v in lora_state_dict(model).items()}
    res = load_checkpoint(tmp_path / "base", [model], optimizer=None, load_rng=False)
    assert sorted(res.missing_optional) == sorted(drawn)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items() if torch.is_tensor(v))
    assert all(torch.equal(lora_state_dict(model)[k], v) for k, v in drawn.items())
    save_checkpoint(tmp_path / "lora", [model])
    more = _model()
    apply_peft(more, _peft(base_lm=ALL), seed=4)
    with pytest.raises(KeyError, match="LoRA targets changed"):
        load_checkpoint(tmp_path / "lora", [more], optimizer=None, load_rng=False)


def test_lora_under_full_recompute_gets_the_same_grads(megatron_single):
    """megatron's full recompute (a reentrant checkpoint per layer) would give adapters behind a frozen
    embedding/LocEnc no gradient at all; with the input hook their grads equal the no-recompute ones."""
    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.model.lora import apply_peft, lora_modules

    grads = {}
    for recompute in (None, "full"):
        cfg = dataclasses.replace(load_model_preset("tiny"), recompute_granularity=recompute)
        torch.manual_seed(0)
        model = VoxCPMModel(cfg).train()
        apply_peft(model, _peft(base_lm=ALL), seed=3)
        gen = torch.Generator().manual_seed(1)
        for _, module in lora_modules(model):
            module.lora_B.data.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.1)
        torch.manual_seed(0)
        out = model(_batch())
        (out["diff_sum"] + out["stop_sum"]).backward()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["full"].keys() == grads[None].keys()
    for name, g in grads[None].items():
        got = grads["full"][name]
        assert got is not None and g.abs().max() > 0, name
        assert (got - g).abs().max() <= 1e-5 * g.abs().max(), name


@pytest.mark.parametrize("targets", [dict(base_lm=[], residual_lm=[], feat_decoder=ALL),
                                     dict(base_lm=ALL, feat_decoder=ALL)], ids=["locdit-only", "tslm+locdit"])
def test_lora_on_locdit_under_local_recompute_gets_the_same_grads(megatron_single, targets):
    """LoRA on the LocDiT with its layers recomputed (`model.recompute_local_granularity=full`): with only
    LocDiT adapters everything before its layers is frozen, so megatron's reentrant checkpoint would give
    them no gradient; with the input hook every adapter's grad is nonzero and equals the no-recompute one.
    The frozen LocEnc (no adapters, nothing trainable before it) is not run under a backward at all."""
    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.model import VoxCPMModel
    from voxcpm_train.model.lora import apply_peft, lora_modules

    grads = {}
    for recompute in (None, "full"):
        cfg = dataclasses.replace(load_model_preset("tiny"), recompute_local_granularity=recompute)
        torch.manual_seed(0)
        model = VoxCPMModel(cfg).train()
        apply_peft(model, _peft(**targets), seed=3)
        gen = torch.Generator().manual_seed(1)
        for _, module in lora_modules(model):
            module.lora_B.data.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.1)
        encoder_input = []
        model.feat_encoder.encoder.register_forward_pre_hook(
            lambda m, a, k: encoder_input.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
        torch.manual_seed(0)
        out = model(_batch())
        (out["diff_sum"] + out["stop_sum"]).backward()
        assert not encoder_input[0].requires_grad          # the hook leaves the frozen LocEnc alone
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["full"].keys() == grads[None].keys()
    assert any("feat_decoder" in name for name in grads[None])
    for name, g in grads[None].items():
        got = grads["full"][name]
        assert got is not None and g.abs().max() > 0, name
        assert torch.equal(got, g), (name, (got - g).abs().max())
