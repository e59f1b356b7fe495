"""Reference ``model.safetensors`` names <-> our megatron ``state_dict()`` names: one declarative table.

Every parameter family is one row: our name pattern, the reference name pattern(s), a transform and
the tensor-parallel split of our tensor. ``{i}`` is a layer index. Layers of the four MiniCPM-4
stacks share one list of rows (``STACK_ROWS``) applied under each stack's prefixes (``STACKS``);
the remaining parameters are listed one by one (``SINGLE_ROWS``) with the pipeline stage that owns
them.

Transforms (reference parts -> our tensor):

* ``identity``  one tensor, unchanged.
* ``qkv``       q, k, v -> megatron's fused ``linear_qkv``, interleaved per query group:
                ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]``.
* ``gate_up``   gate, up -> megatron's fused ``linear_fc1`` ``[gate; up]``.

Tensor-parallel splits of our tensor (megatron's layers):

* ``column``     output rows split in ``tp`` chunks (ColumnParallelLinear). A fused tensor is split
                 part by part and re-fused per rank, exactly as megatron lays it out: rank r holds
                 query groups ``r*G/tp ...`` for ``qkv`` and ``[gate_r; up_r]`` for ``gate_up``.
* ``row``        input columns split (RowParallelLinear).
* ``vocab``      embedding rows split (VocabParallelEmbedding).
* ``replicated`` the same tensor on every rank (norms, the small projections); on gather the ranks
                 must agree bit for bit.

Pipeline: the TSLM (``base_lm``) and RALM (``residual_lm``) layers form one list of
``L_b + L_r`` layers cut into stages exactly as the model cuts them
(:func:`voxcpm_train.model.pipeline.stage_layers`: ``config.pipeline_layers``, or an even split with
the first stages taking one extra); a stage's state dict numbers each stack's layers from 0. Other parameters live on ``first``,
``last`` or ``tslm_end`` (the stage that holds the last TSLM layer).

The public functions are pure (state dicts in, state dicts out); anything not accounted for by the
table raises :class:`ConversionError` naming every offending key. megatron's ``*._extra_state``
entries (None for local linears, fp8 metadata under Transformer Engine) carry no weights and are
skipped on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "ConversionError",
    "Row",
    "Stack",
    "STACKS",
    "STACK_ROWS",
    "SINGLE_ROWS",
    "Entry",
    "pipeline_layout",
    "entries",
    "reference_to_ours",
    "ours_to_reference",
    "reference_keys",
]

Tensor = torch.Tensor
StateDict = Dict[str, Tensor]

IDENTITY, QKV, GATE_UP = "identity", "qkv", "gate_up"
COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"
FIRST, LAST, TSLM_END = "first", "last", "tslm_end"
PIPELINE = "pipeline"  # a stack whose layers are cut across pipeline stages


class ConversionError(ValueError):
    """A state dict does not match the table: missing/unexpected keys, wrong shapes, bad layout."""


@dataclass(frozen=True)
class Row:
    ours: str                 # our name pattern ({i} = stage-local layer index)
    ref: Tuple[str, ...]      # reference name pattern(s), in the transform's part order
    transform: str = IDENTITY
    tp: str = REPLICATED
    stage: Optional[str] = None  # SINGLE_ROWS only: first | last | tslm_end
    arch: Optional[str] = None   # only for this architecture (voxcpm2 | voxcpm)


@dataclass(frozen=True)
class Stack:
    config_key: str   # ModelConfig attribute with the stack's shape ("lm", "encoder", "dit")
    ours: str         # our prefix
    ref: str          # reference prefix
    placement: str    # pipeline | first | last
    final_stage: str  # stage that owns the stack's final norm


# One MiniCPM-4 layer (pre-norm, GQA attention, SwiGLU), relative to the stack prefixes.
STACK_ROWS: Tuple[Row, ...] = (
    Row("layers.{i}.input_layernorm.weight", ("layers.{i}.input_layernorm.weight",)),
    Row(
        "layers.{i}.self_attention.linear_qkv.weight",
        (
            "layers.{i}.self_attn.q_proj.weight",
            "layers.{i}.self_attn.k_proj.weight",
            "layers.{i}.self_attn.v_proj.weight",
        ),
        QKV,
        COLUMN,
    ),
    Row("layers.{i}.self_attention.linear_proj.weight", ("layers.{i}.self_attn.o_proj.weight",), IDENTITY, ROW),
    Row("layers.{i}.pre_mlp_layernorm.weight", ("layers.{i}.post_attention_layernorm.weight",)),
    Row(
        "layers.{i}.mlp.linear_fc1.weight",
        ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
        GATE_UP,
        COLUMN,
    ),
    Row("layers.{i}.mlp.linear_fc2.weight", ("layers.{i}.mlp.down_proj.weight",), IDENTITY, ROW),
)
STACK_FINAL_ROW = Row("norm.weight", ("norm.weight",))

STACKS: Tuple[Stack, ...] = (
    Stack("lm", "base_lm.", "base_lm.", PIPELINE, TSLM_END),
    Stack("residual_lm", "residual_lm.", "residual_lm.", PIPELINE, LAST),
    Stack("encoder", "feat_encoder.encoder.", "feat_encoder.encoder.", FIRST, FIRST),
    Stack("dit", "feat_decoder.estimator.decoder.", "feat_decoder.estimator.decoder.", LAST, LAST),
)


def _linear(name: str, stage: str, bias: bool = True, arch: Optional[str] = None) -> Tuple[Row, ...]:
    """A plain ``torch.nn.Linear`` kept under its reference name on one stage (replicated over TP)."""
    rows = (Row(f"{name}.weight", (f"{name}.weight",), stage=stage, arch=arch),)
    if bias:
        rows += (Row(f"{name}.bias", (f"{name}.bias",), stage=stage, arch=arch),)
    return rows


_DIT = "feat_decoder.estimator."
SINGLE_ROWS: Tuple[Row, ...] = (
    Row("text_embedding.weight", ("base_lm.embed_tokens.weight",), IDENTITY, VOCAB, FIRST),
    Row("feat_encoder.special_token", ("feat_encoder.special_token",), stage=FIRST),
    *_linear("feat_encoder.in_proj", FIRST),
    *_linear("enc_to_lm_proj", FIRST),
    *_linear("fsq_layer.in_proj", TSLM_END),
    *_linear("fsq_layer.out_proj", TSLM_END),
    *_linear("fusion_concat_proj", TSLM_END, arch="voxcpm2"),
    *_linear("lm_to_dit_proj", LAST),
    *_linear("res_to_dit_proj", LAST),
    *_linear(_DIT + "in_proj", LAST),
    *_linear(_DIT + "cond_proj", LAST),
    *_linear(_DIT + "out_proj", LAST),
    *_linear(_DIT + "time_mlp.linear_1", LAST),
    *_linear(_DIT + "time_mlp.linear_2", LAST),
    *_linear(_DIT + "delta_time_mlp.linear_1", LAST),
    *_linear(_DIT + "delta_time_mlp.linear_2", LAST),
    *_linear("stop_proj", LAST),
    *_linear("stop_head", LAST, bias=False),
)


# --------------------------------------------------------------------------------------------- #
# Layout
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _StackShape:
    num_layers: int
    num_heads: int
    num_query_groups: int
    head_dim: int


def _stack_shape(config, key: str) -> _StackShape:
    if key == "residual_lm":
        lm = config.lm
        return _StackShape(config.residual_lm_num_layers, lm.num_attention_heads, lm.num_query_groups, lm.head_dim)
    s = getattr(config, key)
    return _StackShape(s.num_layers, s.num_attention_heads, s.num_query_groups, s.head_dim)


def pipeline_layout(config, pp_size: int) -> List[List[Tuple[str, int]]]:
    """Per stage, the ``(stack config key, global layer index)`` pairs of the TSLM+RALM list.

    The cut is the model's own (:func:`voxcpm_train.model.pipeline.stage_layers`).
    """
    from voxcpm_train.config.model import ConfigError
    from voxcpm_train.model.pipeline import stage_layers

    stages = []
    try:
        for rank in range(pp_size):
            s = stage_layers(config, pp_size, rank)
            stages.append(
                [("lm", s.base_first + i) for i in range(s.base_count)]
                + [("residual_lm", s.residual_first + i) for i in range(s.residual_count)]
            )
    except ConfigError as err:
        raise ConversionError(str(err)) from err
    return stages


def _owner_stage(where: str, config, pp_size: int) -> int:
    if where == FIRST:
        return 0
    if where == LAST:
        return pp_size - 1
    if where == TSLM_END:
        from voxcpm_train.model.pipeline import stage_layers

        return next(r for r in range(pp_size) if stage_layers(config, pp_size, r).holds_last_base_layer)
    raise ConversionError(f"unknown stage placement {where!r}")


# --------------------------------------------------------------------------------------------- #
# Concrete entries
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Entry:
    """One concrete parameter: our stage-local name on ``stage``, its reference names, and how."""

    ours: str
    ref: Tuple[str, ...]
    transform: str
    tp: str
    stage: int
    stack: Optional[_StackShape]  # attention shape for qkv


def entries(config, pp_size: int = 1) -> List[Entry]:
    """Every parameter of the model under ``pp_size`` stages, in table order."""
    layout = pipeline_layout(config, pp_size)
    out: List[Entry] = []
    for stack in STACKS:
        shape = _stack_shape(config, stack.config_key)
        if stack.placement == PIPELINE:
            located = [
                (stage, local, i)
                for stage, layers in enumerate(layout)
                for local, i in enumerate([i for key, i in layers if key == stack.config_key])
            ]
        else:
            stage = _owner_stage(stack.placement, config, pp_size)
            located = [(stage, i, i) for i in range(shape.num_layers)]
        for stage, local, i in located:
            for row in STACK_ROWS:
                out.append(
                    Entry(
                        stack.ours + row.ours.format(i=local),
                        tuple(stack.ref + r.format(i=i) for r in row.ref),
                        row.transform,
                        row.tp,
                        stage,
                        shape,
                    )
                )
        row = STACK_FINAL_ROW
        out.append(
            Entry(
                stack.ours + row.ours,
                tuple(stack.ref + r for r in row.ref),
                row.transform,
                row.tp,
                _owner_stage(stack.final_stage, config, pp_size),
                shape,
            )
        )
    for row in SINGLE_ROWS:
        if row.arch is not None and row.arch != config.architecture:
            continue
        out.append(Entry(row.ours, row.ref, row.transform, row.tp, _owner_stage(row.stage, config, pp_size), None))
    return out


def reference_keys(config) -> List[str]:
    """Every name the reference ``model.safetensors`` of ``config`` holds."""
    return [r for e in entries(config) for r in e.ref]


# --------------------------------------------------------------------------------------------- #
# Transforms and tensor-parallel split/gather
# --------------------------------------------------------------------------------------------- #


def _fuse(entry: Entry, parts: Sequence[Tensor], groups: int) -> Tensor:
    if entry.transform == IDENTITY:
        return parts[0]
    if entry.transform == GATE_UP:
        gate, up = parts
        if gate.shape != up.shape:
            raise ConversionError(
                f"{entry.ref[0]} shape {tuple(gate.shape)} != {entry.ref[1]} shape {tuple(up.shape)}"
            )
        return torch.cat([gate, up], dim=0)
    if entry.transform == QKV:
        q, k, v = parts
        d = entry.stack.head_dim
        heads_per_group = entry.stack.num_heads // entry.stack.num_query_groups
        want = {
            entry.ref[0]: (groups * heads_per_group * d,),
            entry.ref[1]: (groups * d,),
            entry.ref[2]: (groups * d,),
        }
        for name, t in zip(entry.ref, parts):
            if tuple(t.shape[:1]) != want[name] or t.shape[1:] != q.shape[1:]:
                raise ConversionError(
                    f"{name}: shape {tuple(t.shape)} does not fit {groups} query groups x "
                    f"head dim {d} (expected {want[name] + tuple(q.shape[1:])})"
                )
        rest = tuple(q.shape[1:])
        return torch.cat(
            [q.reshape(groups, heads_per_group * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)],
            dim=1,
        ).reshape(-1, *rest)
    raise ConversionError(f"unknown transform {entry.transform!r} for {entry.ours}")


def _unfuse(entry: Entry, t: Tensor, groups: int) -> List[Tensor]:
    if entry.transform == IDENTITY:
        return [t]
    if entry.transform == GATE_UP:
        if t.shape[0] % 2:
            raise ConversionError(f"{entry.ours}: shape {tuple(t.shape)} has an odd number of rows for [gate; up]")
        return list(torch.chunk(t, 2, dim=0))
    if entry.transform == QKV:
        d = entry.stack.head_dim
        heads_per_group = entry.stack.num_heads // entry.stack.num_query_groups
        rows = groups * (heads_per_group + 2) * d
        if t.shape[0] != rows:
            raise ConversionError(
                f"{entry.ours}: shape {tuple(t.shape)} does not fit {groups} query groups x "
                f"({heads_per_group} q + k + v heads) x head dim {d} = {rows} rows"
            )
        rest = tuple(t.shape[1:])
        q, k, v = torch.split(t.reshape(groups, (heads_per_group + 2) * d, *rest), [heads_per_group * d, d, d], dim=1)
        return [x.reshape(-1, *rest) for x in (q, k, v)]
    raise ConversionError(f"unknown transform {entry.transform!r} for {entry.ours}")


_TP_AXIS = {COLUMN: 0, VOCAB: 0, ROW: 1}


def _tp_chunk(entry: Entry, name: str, t: Tensor, tp_size: int, tp_rank: int) -> Tensor:
    if entry.tp == REPLICATED or tp_size == 1:
        return t
    axis = _TP_AXIS[entry.tp]
    if t.dim() <= axis or t.shape[axis] % tp_size:
        raise ConversionError(
            f"{name}: shape {tuple(t.shape)} cannot be split in {tp_size} along dim {axis} ({entry.tp} parallel)"
        )
    return torch.chunk(t, tp_size, dim=axis)[tp_rank].clone()


def _groups_per_rank(entry: Entry, tp_size: int) -> int:
    if entry.transform != QKV:
        return 0
    g = entry.stack.num_query_groups
    if entry.tp == COLUMN and g % tp_size:
        raise ConversionError(f"{entry.ours}: {g} query groups cannot be split over tp={tp_size}")
    return g // tp_size if entry.tp == COLUMN else g


# --------------------------------------------------------------------------------------------- #
# Public conversions
# --------------------------------------------------------------------------------------------- #


def _key_report(what: str, missing: Iterable[str], unexpected: Iterable[str]) -> str:
    missing, unexpected = sorted(missing), sorted(unexpected)
    lines = [what]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    return "\n".join(lines)


def _check_layout(config, tp_size: int, tp_rank: int, pp_size: int, pp_rank: int) -> None:
    if not (tp_size >= 1 and 0 <= tp_rank < tp_size and pp_size >= 1 and 0 <= pp_rank < pp_size):
        raise ConversionError(f"bad layout tp_rank={tp_rank}/tp_size={tp_size}, pp_rank={pp_rank}/pp_size={pp_size}")


def reference_to_ours(
    ref_sd: Mapping[str, Tensor],
    config,
    tp_size: int = 1,
    tp_rank: int = 0,
    pp_size: int = 1,
    pp_rank: int = 0,
) -> StateDict:
    """Our state dict of pipeline stage ``pp_rank`` / tensor rank ``tp_rank`` from reference weights.

    ``ref_sd`` must hold exactly the reference names of ``config`` (no ``audio_vae.*``): any
    missing or unexpected name raises :class:`ConversionError` listing them all.
    """
    _check_layout(config, tp_size, tp_rank, pp_size, pp_rank)
    table = entries(config, pp_size)
    wanted = {r for e in table for r in e.ref}
    if set(ref_sd) != wanted:
        raise ConversionError(
            _key_report(
                "reference weights do not match the VoxCPM table for this config:",
                wanted - set(ref_sd),
                set(ref_sd) - wanted,
            )
        )
    out: StateDict = {}
    for e in table:
        if e.stage != pp_rank:
            continue
        groups = _groups_per_rank(e, tp_size)
        parts = [_tp_chunk(e, r, ref_sd[r], tp_size, tp_rank) for r in e.ref]
        out[e.ours] = _fuse(e, parts, groups).contiguous()
    return out


def _is_ignorable(key: str, value) -> bool:
    # megatron/TE modules may add `_extra_state` entries (fp8 metadata, None or empty) to state_dict().
    return key.endswith("._extra_state") or key == "_extra_state"


def ours_to_reference(shards: Sequence[Sequence[Mapping[str, Tensor]]], config) -> StateDict:
    """Reference weights from our state dicts ``shards[pp_rank][tp_rank]`` (every rank of one model).

    Tensor-parallel pieces are gathered (replicated tensors must agree bit for bit across ranks);
    pipeline stages are numbered back to global layer indices. Any key of any shard not in the
    table, or any table key absent from its shard, raises :class:`ConversionError`.
    """
    pp_size = len(shards)
    if pp_size == 0 or any(len(s) == 0 for s in shards):
        raise ConversionError("ours_to_reference needs shards[pp_rank][tp_rank] for every rank")
    tp_size = len(shards[0])
    if any(len(s) != tp_size for s in shards):
        raise ConversionError(f"ragged shards: tp sizes per stage {[len(s) for s in shards]}")
    table = entries(config, pp_size)
    for pp_rank in range(pp_size):
        wanted = {e.ours for e in table if e.stage == pp_rank}
        for tp_rank, sd in enumerate(shards[pp_rank]):
            have = {k for k, v in sd.items() if not _is_ignorable(k, v)}
            if have != wanted:
                raise ConversionError(
                    _key_report(
                        f"state dict of pp_rank={pp_rank}, tp_rank={tp_rank} does not match the VoxCPM table:",
                        wanted - have,
                        have - wanted,
                    )
                )
    out: StateDict = {}
    for e in table:
        pieces = [shards[e.stage][r][e.ours] for r in range(tp_size)]
        groups = _groups_per_rank(e, tp_size)
        if e.tp == REPLICATED or tp_size == 1:
            for r, p in enumerate(pieces[1:], start=1):
                if p.shape != pieces[0].shape or not torch.equal(p, pieces[0]):
                    raise ConversionError(
                        f"{e.ours} (pp_rank={e.stage}) is replicated but tp_rank {r} differs from tp_rank 0"
                    )
            parts = _unfuse(e, pieces[0], groups)
        else:
            axis = _TP_AXIS[e.tp]
            per_rank = [_unfuse(e, p, groups) for p in pieces]
            parts = [torch.cat([pr[j] for pr in per_rank], dim=axis) for j in range(len(e.ref))]
        for name, t in zip(e.ref, parts):
            out[name] = t.contiguous()
    return out
