"""LoRA adapters on megatron linears (tensor-parallel aware) and module freezing (`peft` config).

An adapted linear computes `y = base(x) + (alpha / r) · dropout(B(A(x)))` with A [r, in] (Kaiming
uniform, as `nn.Linear`) and B [out, r] (zeros), the reference package's `LoRALinear` convention.
`add_lora` mixes `LoRALinearMixin` into the linear's own class (the way torch's FSDP2 `fully_shard`
does), so the module keeps its type, its forward contract (megatron's `forward(x) -> (out, bias)` or
a plain tensor for `nn.Linear`) and its state-dict names: the base weight stays `<name>.weight` (a
checkpoint without adapters loads into an adapted model) and the adapters are `<name>.lora_A` /
`<name>.lora_B`, matching the reference's names.

Tensor parallelism (the mode follows the base layer):

* column (`ColumnParallelLinear`, TE column linears): A replicated [r, in], B split by output rows
  [out/tp, r]. `h = A x` is identical on every TP rank; `copy_to_tensor_model_parallel_region(h)`
  all-reduces dL/dh in backward, so A's grad is complete on each rank. With sequence parallelism x is
  a sequence shard: `h` is all-gathered over the sequence instead (reduce-scatter in backward) and A's
  grad is partial per rank (`sequence_parallel` attribute: summed over TP by finalize_model_grads).
  Fused layouts: B follows the weight's rows (`linear_qkv` per query group [q, k, v]; `linear_fc1`
  [gate; up], checkpointed with megatron's SwiGLU factory like the weight).
* row (`RowParallelLinear`, TE row linears): A split by input columns [r, in/tp], B replicated
  [out, r]; `h = reduce_from_tensor_model_parallel_region(A_local x_local)` (all-reduce), or
  `reduce_scatter_to_sequence_parallel_region` with sequence parallelism (B then `sequence_parallel`).
* replicated (`torch.nn.Linear`, the projections): A and B replicated; they inherit the weight's
  `sequence_parallel` attribute (fusion_concat_proj under SP).

Replicated adapter tensors not marked `sequence_parallel` get `average_gradients_across_tp_domain`.
A is drawn from a generator seeded by (seed, the linear's global name) as a full [r, in] tensor and
then sliced, so every TP/PP layout starts from the same adapters.

Transformer Engine's norm-fused `TELayerNormColumnParallelLinear` takes the un-normalized input; the
adapter recomputes the norm from the module's own `layer_norm_weight` (RMSNorm or LayerNorm, fp32
statistics) so it sees what the base GEMM sees.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from voxcpm_train.config.model import ConfigError
from voxcpm_train.config.peft import LORA_PROJECTIONS, LORA_STACKS, PeftConfig

__all__ = [
    "LoRALinearMixin",
    "PeftSummary",
    "add_lora",
    "apply_peft",
    "lora_modules",
    "lora_state_dict",
    "merged_state_dict",
]

COLUMN, ROW, REPLICATED = "column", "row", "replicated"
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def is_adapter_key(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def _parallel_mode(module: torch.nn.Module) -> str:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return COLUMN
    if isinstance(module, RowParallelLinear):
        return ROW
    te_mode = getattr(module, "parallel_mode", None)  # Transformer Engine linears
    if te_mode in (COLUMN, ROW):
        return te_mode
    if te_mode == "duplicated" or isinstance(module, torch.nn.Linear):
        return REPLICATED
    raise ConfigError(f"LoRA: {type(module).__name__} is not a linear layer LoRA knows how to adapt")


class LoRALinearMixin:
    """Adapter behaviour mixed into a linear's class by :func:`add_lora` (see the module docstring)."""

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x, *args, **kwargs):
        gather = None
        if self.lora_mode == COLUMN and hasattr(self, "output_size_per_partition"):  # megatron's own
            weight = kwargs.get("weight", args[0] if args else None)
            if weight is not None:
                raise ValueError("a LoRA ColumnParallelLinear uses its own weight (no `weight` argument)")
            gather = kwargs.get("runtime_gather_output", args[1] if len(args) > 1 else None)
        out = super().forward(x, *args, **kwargs)
        delta = self.lora_delta(x, gather)
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta

    def lora_delta(self, x: torch.Tensor, runtime_gather_output: Optional[bool] = None) -> torch.Tensor:
        """`(alpha / r) · dropout(B(A(x)))` laid out like the base output ([S(/tp), B, out(/tp)])."""
        from megatron.core import tensor_parallel as tpl

        group = getattr(self, "tp_group", None)
        sp = bool(getattr(self, "sequence_parallel", False))
        if getattr(self, "layer_norm_weight", None) is not None:
            x = self._lora_norm(x)
        mode = self.lora_mode
        distributed_out = False
        if mode == COLUMN:
            h = F.linear(x, self.lora_A)
            if sp:
                h = tpl.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=group)
            else:
                h = tpl.copy_to_tensor_model_parallel_region(h, group=group)
            y = F.linear(h, self.lora_B)
            gather = getattr(self, "gather_output", False) if runtime_gather_output is None else runtime_gather_output
            distributed_out = not gather
        elif mode == ROW:
            if not getattr(self, "input_is_parallel", True):
                x = tpl.scatter_to_tensor_model_parallel_region(x, group=group)
            h = F.linear(x, self.lora_A)
            if sp:
                h = tpl.reduce_scatter_to_sequence_parallel_region(h, group=group)
            else:
                h = tpl.reduce_from_tensor_model_parallel_region(h, group=group)
            y = F.linear(h, self.lora_B)
            distributed_out = sp
            gather = False
        else:
            y = F.linear(F.linear(x, self.lora_A), self.lora_B)
            gather = False
        if self.lora_dropout > 0 and self.training:
            if distributed_out:  # each rank holds another slice: its own dropout stream
                with tpl.get_cuda_rng_tracker().fork():
                    y = F.dropout(y, self.lora_dropout)
            else:
                y = F.dropout(y, self.lora_dropout)
        if mode == COLUMN and gather:
            y = tpl.gather_from_tensor_model_parallel_region(y, group=group)
        return y * self.lora_scaling

    def _lora_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm a norm-fused (Transformer Engine LayerNorm*Linear) module applies before its GEMM."""
        weight = self.layer_norm_weight
        if getattr(self, "zero_centered_gamma", False):
            weight = weight + 1
        eps = getattr(self, "eps", None)
        kind = getattr(self, "normalization", None)
        if eps is None or kind not in ("RMSNorm", "LayerNorm"):
            raise ConfigError(
                f"LoRA on {type(self).__name__}: cannot recompute its fused norm (normalization={kind!r}, "
                f"eps={eps!r}); use the local layer spec"
            )
        xf = x.float()
        if kind == "RMSNorm":
            normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            return normed.to(x.dtype) * weight
        bias = getattr(self, "layer_norm_bias", None)
        return F.layer_norm(xf, (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps).to(x.dtype)

    # --------------------------------------------------------------------------------- weights
    def lora_merged_weight(self) -> torch.Tensor:
        """`weight + (alpha / r) · B @ A` in fp32, this rank's shard (for exports at TP = 1)."""
        delta = self.lora_B.detach().float() @ self.lora_A.detach().float()
        return self.weight.detach().float() + self.lora_scaling * delta

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The base layer's sharded tensors plus the adapters, TP-sharded as in the module docstring."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        base = super()
        if hasattr(base, "sharded_state_dict"):
            sharded = base.sharded_state_dict(prefix, sharded_offsets, metadata)
        else:  # torch.nn.Linear: replicated
            own = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items() if not k.startswith("lora_")}
            sharded = make_sharded_tensors_for_checkpoint(own, prefix, {}, sharded_offsets,
                                                          tp_group=self._lora_tp_group(), dp_cp_group=metadata["dp_cp_group"])
        for name in ("lora_A", "lora_B"):
            sharded.pop(f"{prefix}{name}", None)
        axis = {COLUMN: {"lora_B": 0}, ROW: {"lora_A": 1}}.get(self.lora_mode, {})
        adapters = make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix, axis, sharded_offsets,
            tp_group=self._lora_tp_group(), dp_cp_group=metadata["dp_cp_group"],
        )
        if self.lora_swiglu:
            key = f"{prefix}lora_B"
            adapters[key] = apply_swiglu_sharded_factory(
                adapters[key], sharded_offsets, bool(metadata.get("singleton_local_shards", False))
            )
        sharded.update(adapters)
        return sharded

    def _lora_tp_group(self):
        from megatron.core import parallel_state

        group = getattr(self, "tp_group", None)
        return group if group is not None else parallel_state.get_tensor_model_parallel_group()

    def extra_repr(self) -> str:
        base = super().extra_repr()
        lora = f"lora_rank={self.lora_A.shape[0]}, lora_scaling={self.lora_scaling:g}, lora_mode={self.lora_mode}"
        return f"{base}, {lora}" if base else lora


_LORA_CLASSES: Dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if issubclass(cls, LoRALinearMixin):
        raise ValueError(f"{cls.__name__} already has LoRA adapters")
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRALinearMixin, cls), {"__module__": __name__})
    return _LORA_CLASSES[cls]


def _seeded_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def add_lora(module: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0, *,
             key: str, seed: int = 0, swiglu: bool = False) -> torch.nn.Module:
    """Give the linear `module` (in place) LoRA adapters of `rank`; returns it.

    `key`: the layout-independent name of the linear (global layer numbers) that seeds A's draw;
    `swiglu`: the output rows are megatron's fused [gate; up] (linear_fc1 with a gated MLP).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    mode = _parallel_mode(module)
    weight = module.weight
    out_local, in_local = weight.shape
    tp = parallel_state.get_tensor_model_parallel_world_size() if mode != REPLICATED else 1
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if mode != REPLICATED else 0
    in_full = in_local * tp if mode == ROW else in_local
    gen = _seeded_generator(seed, key)
    bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform_(a=sqrt(5)) on [r, in], as nn.Linear / the reference
    a_full = torch.empty(rank, in_full).uniform_(-bound, bound, generator=gen)
    a_local = a_full.chunk(tp, dim=1)[tp_rank] if mode == ROW else a_full
    with torch.no_grad():
        lora_A = torch.nn.Parameter(a_local.to(device=weight.device, dtype=weight.dtype).contiguous())
        lora_B = torch.nn.Parameter(torch.zeros(out_local, rank, device=weight.device, dtype=weight.dtype))
    for param in (lora_A, lora_B):  # a base checkpoint (no adapters) loads: they stay as drawn here
        setattr(param, "optional_in_checkpoint", True)
    module.__class__ = _lora_class(type(module))
    module.lora_A, module.lora_B = lora_A, lora_B
    module.lora_mode = mode
    module.lora_scaling = float(alpha) / rank
    module.lora_dropout = float(dropout)
    module.lora_swiglu = bool(swiglu)
    sp = bool(getattr(module, "sequence_parallel", False)) if mode != REPLICATED else bool(
        getattr(weight, "sequence_parallel", False))
    split, replicated = {COLUMN: (lora_B, lora_A), ROW: (lora_A, lora_B)}.get(mode, (None, None))
    if split is not None:
        set_tensor_model_parallel_attributes(split, True, 1 if mode == ROW else 0, 1)
        _mark_replicated(replicated, sp)
    else:
        _mark_replicated(lora_A, sp)
        _mark_replicated(lora_B, sp)
    return module


def _mark_replicated(param: torch.nn.Parameter, sequence_parallel: bool) -> None:
    if sequence_parallel:  # partial grads per rank: summed over TP (finalize_model_grads)
        setattr(param, "sequence_parallel", True)
    else:  # identical grads on every TP rank
        setattr(param, "average_gradients_across_tp_domain", True)


def lora_modules(model: torch.nn.Module) -> Iterator[Tuple[str, LoRALinearMixin]]:
    """(name, module) of every adapted linear, in `named_modules` order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinearMixin):
            yield name, module


def lora_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors `<linear>.lora_A` / `.lora_B` (detached)."""
    return {k: v.detach() for k, v in model.state_dict().items() if is_adapter_key(k)}


def merged_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """`model.state_dict()` without adapters, every adapted weight replaced by `W + (alpha/r)·B@A`
    (computed in fp32, cast back to the weight's dtype). Meant for a TP = 1 model (exports)."""
    sd = {k: v.detach() if torch.is_tensor(v) else v for k, v in model.state_dict().items() if not is_adapter_key(k)}
    for name, module in lora_modules(model):
        key = f"{name}.weight" if name else "weight"
        sd[key] = module.lora_merged_weight().to(module.weight.dtype)
    return sd


# --------------------------------------------------------------------------------------------- #
# applying the peft config to a VoxCPMModel stage
# --------------------------------------------------------------------------------------------- #


@dataclass
class PeftSummary:
    adapted: List[str] = field(default_factory=list)        # names of the adapted linears on this rank
    unmatched: List[str] = field(default_factory=list)      # config entries with nothing on this rank
    trainable: int = 0
    frozen: int = 0

    def describe(self) -> str:
        total = self.trainable + self.frozen
        share = 100.0 * self.trainable / total if total else 0.0
        return (f"{len(self.adapted)} LoRA linears, {self.trainable:,} trainable / {total:,} parameters "
                f"({share:.2f} %) on this rank")


def _module_at(model: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


_LAYER_LINEAR_PATHS = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}


def apply_peft(model: torch.nn.Module, peft: PeftConfig, seed: int = 0) -> PeftSummary:
    """Add the configured LoRA adapters to this stage of a VoxCPMModel and freeze what the config
    freezes (`requires_grad=False`: megatron's DDP and optimizer then give them no grad buffer and no
    optimizer state). Call before DDP wrapping. Entries naming nothing on this stage are returned in
    `unmatched` (the caller checks that some rank has them)."""
    summary = PeftSummary()
    if peft.uses_lora:
        lora = peft.lora
        for group, stack_path in LORA_STACKS.items():
            names = getattr(lora, group)
            stack = _module_at(model, stack_path)
            if not names or stack is None:
                continue
            for index, layer in enumerate(stack.layers):
                global_index = getattr(stack, "first_layer", 0) + index
                for name in names:
                    path = _LAYER_LINEAR_PATHS[name]
                    swiglu = name == "linear_fc1" and bool(getattr(layer.config, "gated_linear_unit", False))
                    add_lora(_module_at(layer, path), lora.group_rank(group), lora.alpha, lora.dropout,
                             key=f"{stack_path}.layers.{global_index}.{path}", seed=seed, swiglu=swiglu)
                    summary.adapted.append(f"{stack_path}.layers.{index}.{path}")
        for name in lora.projections:
            assert name in LORA_PROJECTIONS
            module = getattr(model, name, None)
            if module is None:
                summary.unmatched.append(f"peft.lora.projections: {name}")
                continue
            add_lora(module, lora.group_rank("projections"), lora.alpha, lora.dropout, key=name, seed=seed)
            summary.adapted.append(name)
    named = list(model.named_parameters())
    if peft.uses_lora and not peft.lora.train_base:
        for name, param in named:
            if not is_adapter_key(name):
                param.requires_grad_(False)
    for prefix in peft.freeze:
        hit = False
        for name, param in named:
            if name == prefix or name.startswith(prefix + "."):
                param.requires_grad_(False)
                hit = True
        if not hit:
            summary.unmatched.append(f"peft.freeze: {prefix}")
    summary.trainable = sum(p.numel() for _, p in named if p.requires_grad)
    summary.frozen = sum(p.numel() for _, p in named if not p.requires_grad)
    if summary.frozen:
        _recompute_inputs_require_grad(model)
    return summary


def _input_requires_grad(module, args, kwargs):
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_grad_enabled() or hidden is None or hidden.requires_grad:
        return None
    if not any(p.requires_grad for p in module.layers.parameters()):
        return None   # a frozen block behind frozen modules: no gradient is wanted in it, nothing to store
    hidden = hidden.detach().requires_grad_(True)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _recompute_inputs_require_grad(model: torch.nn.Module) -> None:
    """megatron's full recompute runs each layer inside a reentrant `CheckpointFunction`: when its input
    does not require grad (the modules before it are frozen), nothing inside gets a gradient, adapters
    included. Make the input of every fully recomputed block require grad (as PEFT libraries do with
    `enable_input_require_grads`), unless nothing in its layers trains (e.g. a frozen LocEnc under
    `model.recompute_local_granularity=full`: it then stores nothing and runs no backward)."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(module, TransformerBlock) and getattr(config, "recompute_granularity", None) == "full" \
                and not getattr(module, "_voxcpm_input_grad_hook", False):
            module.register_forward_pre_hook(_input_requires_grad, with_kwargs=True)
            module._voxcpm_input_grad_hook = True
