"""Distributed checkpoints: model + optimizer with megatron ``dist_checkpointing`` (torch_dist),
reshardable across TP/PP/DP layouts and across distributed/non-distributed optimizers.

Layout of a checkpoint directory::

    <dir>/model/               torch_dist checkpoint: model tensors and optimizer state tensors
    <dir>/extra_state.json     rank 0: step, scheduler, layout, user's extra state (JSON)
    <dir>/rank_state/rank_NNNNN.pt   per rank: RNG states + user's per-rank state
                                     (torch.save, read with weights_only=True)

``extra_state.json`` is written last: a directory without it is an incomplete checkpoint.
Reading never unpickles arbitrary objects (see :mod:`.safe_load`).

Optimizer state is stored in model space: every parameter ``<key>`` has ShardedTensors
``optimizer.state.{exp_avg,exp_avg_sq}.<key>`` shaped (and sharded) like the parameter (plus
``optimizer.state.param.<key>`` / ``fp32_param`` for the distributed optimizer), which is the
same naming megatron uses for the non-distributed optimizer and for the distributed optimizer's
``fully_reshardable`` format. Non-tensor optimizer state (param groups) is not stored: it comes
from the OptimizerConfig and the scheduler; the Adam step is stored in ``extra_state.json``.
This also sidesteps megatron-core 0.16 pitfalls (see docs/platform.md).

Parameters marked ``optional_in_checkpoint`` (LoRA adapters) may be absent from a checkpoint
(a base model): they are then left as initialised and listed in ``LoadResult.missing_optional``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .model import unwrap_model
from .optim import inner_optimizers
from .safe_load import safe_dcp_reading

__all__ = ["save_checkpoint", "load_checkpoint", "LoadResult", "is_complete_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_EXTRA = "extra_state.json"
_MODEL_DIR = "model"
_RANK_DIR = "rank_state"
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class LoadResult:
    """What came back besides the tensors. ``rank_state``/``rng_restored`` only when the saved
    layout equals the current one (per-rank state does not survive a layout change)."""

    extra_state: dict
    rank_state: dict | None
    rng_restored: bool
    saved_layout: dict
    optimizer_loaded: bool
    # state-dict keys of parameters marked `optional_in_checkpoint` (LoRA adapters) that the
    # checkpoint lacks: left as initialised (e.g. adapters on a base model's weights)
    missing_optional: list = field(default_factory=list)


# ----------------------------------------------------------------------------- layout / helpers


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def is_complete_checkpoint(ckpt_dir) -> bool:
    return (Path(ckpt_dir) / _EXTRA).is_file() and (Path(ckpt_dir) / _MODEL_DIR).is_dir()


def _is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def _torch_adam(opt) -> bool:
    return isinstance(getattr(opt, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))


def _prime_adam_state(optimizer) -> None:
    """Give every parameter an Adam state (zeros, step 0) as a fresh step would.

    megatron's DistributedOptimizer.state_dict() asserts a single step value, which an empty
    state lacks; building a load-side sharded state dict needs the state allocated.
    """
    for opt in inner_optimizers(optimizer):
        if not _torch_adam(opt):
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _optimizer_step(optimizer) -> int:
    steps = set()
    for opt in inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for st in inner.state.values():
            if "step" in st:
                steps.add(int(st["step"]))
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the Adam step: {sorted(steps)}")
    return steps.pop() if steps else 0


def _untie_steps(optimizer) -> None:
    """After a load, megatron's distributed optimizer gives every parameter the *same* step
    tensor, which torch Adam then increments once per parameter: give each its own copy."""
    for opt in inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].detach().clone()


def _check_single_bucket(optimizer) -> None:
    for opt in inner_optimizers(optimizer):
        if not _is_distributed(opt):
            continue
        for buf in opt.buffers:
            if len(buf.buckets) != 1:
                raise RuntimeError(
                    "fully_reshardable distributed-optimizer checkpoints need one DDP bucket per "
                    f"buffer on megatron-core 0.16 (found {len(buf.buckets)}; state would be "
                    "scrambled, fixed upstream in Megatron-LM PR #5077). Use "
                    "overlap_grad_reduce=False or bucket_size=None."
                )


def _patch_state_setter(opt) -> None:
    """megatron 0.16 copies every key of the local Adam state (incl. ``step``) from the loaded
    tensors, which lack ``step`` (and ``param`` when the checkpoint came from a non-distributed
    optimizer): copy only what was loaded. Instance-level, this optimizer only."""
    if getattr(opt, "_voxcpm_setter_patched", False):
        return
    original = opt._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            if key not in dst:
                raise KeyError(f"optimizer state {key!r} in checkpoint has no local counterpart")
            dst[key].copy_(value)

    opt._set_main_param_and_optimizer_states = types.MethodType(
        _set_main_param_and_optimizer_states, opt
    )
    opt._voxcpm_setter_patched = True


def _sharded_leaves(tree, out: dict) -> dict:
    """Collect ShardedBase leaves of a nested dict/list by id."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(tree, dict):
        for v in tree.values():
            _sharded_leaves(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _sharded_leaves(v, out)
    elif isinstance(tree, ShardedBase):
        out[id(tree)] = tree
    return out


def _prune(tree, keep):
    """Drop ShardedBase leaves for which keep(leaf) is False (dicts only)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(tree, dict):
        for k in list(tree):
            v = tree[k]
            if isinstance(v, ShardedBase):
                if not keep(v):
                    del tree[k]
            else:
                _prune(v, keep)
    elif isinstance(tree, list):
        for v in tree:
            _prune(v, keep)


def _replace_leaves(tree, values: dict):
    """Copy of ``tree`` with ShardedBase leaves replaced by ``values[id(leaf)]`` (and local
    non-persistent objects unwrapped), i.e. what ``dist_checkpointing.load`` would return."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(tree, dict):
        return {k: _replace_leaves(v, values) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_replace_leaves(v, values) for v in tree]
    if isinstance(tree, ShardedBase):
        return values[id(tree)]
    if isinstance(tree, LocalNonpersistentObject):
        return tree.unwrap()
    return tree


# ----------------------------------------------------------------------------- RNG


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()
                    if torch.is_tensor(v)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if hasattr(torch, "npu") and torch.npu.is_available():
        state["npu"] = torch.npu.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "npu" in state and hasattr(torch, "npu"):
        torch.npu.set_rng_state(state["npu"])
    tracker = get_cuda_rng_tracker()
    if state["tracker"]:
        tracker.set_states({k: v.clone() for k, v in state["tracker"].items()})


# ----------------------------------------------------------------------------- save / load


def _model_sharded_state_dict(model_chunks: list) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline (several model chunks) is not supported")
    return unwrap_model(model_chunks[0]).sharded_state_dict()


def _optimizer_sharded_tensors(optimizer, model_sd: dict, is_loading: bool):
    """Per inner optimizer: (opt, megatron sharded state dict); plus a flat list of its
    ShardedBase leaves (a key may repeat: stacked layers are shards of one tensor)."""
    trees, flat = [], []
    for opt in inner_optimizers(optimizer):
        tree = opt.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(_SHARDING))
        trees.append((opt, tree))
        flat.extend(_sharded_leaves(tree, {}).values())
    return trees, flat


def save_checkpoint(
    ckpt_dir,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    extra_state: dict | None = None,
    rank_state: dict | None = None,
    *,
    async_save: bool = False,
):
    """Save model (+ optimizer, scheduler) to ``ckpt_dir`` (collective over all ranks).

    ``extra_state``: JSON-serialisable run state (step, consumed samples, config) written by
    rank 0. ``rank_state``: per-rank state (e.g. data-loader position) of tensors/containers/
    primitives; stored with this rank's RNG states.

    ``async_save=True``: megatron's async torch_dist path. Everything the checkpoint holds is
    captured now (sharded state dict planned, CPU copies / views of the tensors taken, RNG,
    scheduler and step recorded, ``common.pt`` and ``rank_state/`` written); the tensor files
    are written by the returned megatron ``AsyncRequest``, which the caller must schedule at
    once (``AsyncCallsQueue(persistent=False).schedule_async_request``: a *forked* writer, whose
    copy-on-write snapshot of this process is what makes CPU tensors that training goes on
    updating safe) and finalize on every rank. Its finalize functions write ``.metadata`` /
    ``metadata.json`` (megatron, raising if any rank's write failed) and then
    ``extra_state.json``, so the directory is a complete checkpoint only after finalization.
    Returns None for a synchronous save.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank()
    if (ckpt_dir / _EXTRA).exists() or (ckpt_dir / _MODEL_DIR).exists():  # every rank raises
        raise FileExistsError(f"checkpoint directory {ckpt_dir} already holds a checkpoint")
    try:  # checked on every rank, so a bad value cannot leave the others waiting for rank 0
        json.dumps(extra_state or {})
    except TypeError as e:
        raise TypeError(f"save_checkpoint: extra_state must be JSON-serialisable: {e}") from None
    dist.barrier()
    if rank == 0:
        (ckpt_dir / _MODEL_DIR).mkdir(parents=True, exist_ok=True)
        (ckpt_dir / _RANK_DIR).mkdir(parents=True, exist_ok=True)
    dist.barrier()

    for chunk in model_chunks:  # overlap_param_gather: the last step's all-gather waits for the next forward
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)
    sharded = {"model": _model_sharded_state_dict(model_chunks)}
    step = 0
    if optimizer is not None:
        _check_single_bucket(optimizer)
        _prime_adam_state(optimizer)
        step = _optimizer_step(optimizer)
        _, flat = _optimizer_sharded_tensors(optimizer, sharded["model"], is_loading=False)
        sharded["optimizer_tensors"] = flat
    _use_fork_results_queue()
    request = dist_checkpointing.save(sharded, str(ckpt_dir / _MODEL_DIR),
                                      async_sharded_save=async_save)

    torch.save(
        {"rng": _rng_state(), "layout": _layout(), "user": rank_state},
        ckpt_dir / _RANK_DIR / f"rank_{rank:05d}.pt",
    )
    # captured now: with an async save the scheduler/optimizer move on before finalization
    meta = None
    if rank == 0:
        meta = json.dumps({
            "format_version": FORMAT_VERSION,
            "layout": _layout(),
            "optimizer": None if optimizer is None else {
                "step": step,
                "distributed": any(_is_distributed(o) for o in inner_optimizers(optimizer)),
                "grad_scaler": _grad_scaler_state(optimizer),
            },
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "extra": extra_state or {},
        }, indent=1, sort_keys=True)

    def write_extra_state():
        dist.barrier()
        if rank == 0:
            tmp = ckpt_dir / (_EXTRA + ".tmp")
            tmp.write_text(meta)
            os.replace(tmp, ckpt_dir / _EXTRA)
        dist.barrier()

    if request is None:
        write_extra_state()
        return None
    request.add_finalize_fn(write_extra_state)   # after megatron's own (.metadata, metadata.json)
    return request


def _grad_scaler_state(optimizer):
    scalers = [getattr(o, "grad_scaler", None) for o in inner_optimizers(optimizer)]
    scalers = [s for s in scalers if s is not None]
    if not scalers:
        return None
    sd = scalers[0].state_dict()
    return {k: (v.item() if torch.is_tensor(v) else v) for k, v in sd.items()}


def load_checkpoint(
    ckpt_dir,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    *,
    strict: bool = True,
    load_rng: bool = True,
    load_optimizer: bool = True,
) -> LoadResult:
    """Load a checkpoint written by :func:`save_checkpoint`, under any TP/PP/DP layout and either
    optimizer kind. With ``load_optimizer=False`` (or no optimizer) only the weights are loaded
    (the optimizer's main params are refreshed from them); asking for optimizer state the
    checkpoint lacks raises. RNG and per-rank state are restored only if the layout matches.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if not is_complete_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {_EXTRA})")
    meta = json.loads((ckpt_dir / _EXTRA).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{ckpt_dir}: checkpoint format {meta.get('format_version')}, "
                         f"expected {FORMAT_VERSION}")
    model_dir = str(ckpt_dir / _MODEL_DIR)

    request = {"model": _model_sharded_state_dict(model_chunks)}
    trees = []
    weights_only_into = optimizer if (optimizer is not None and not load_optimizer) else None
    if not load_optimizer:
        optimizer = None
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise ValueError(f"{ckpt_dir} holds no optimizer state")
        _prime_adam_state(optimizer)
        for opt in inner_optimizers(optimizer):
            if _is_distributed(opt):
                _patch_state_setter(opt)
        trees, flat = _optimizer_sharded_tensors(optimizer, request["model"], is_loading=True)
        with safe_dcp_reading():
            available = set(dist_checkpointing.load_tensors_metadata(model_dir).keys())
        missing = sorted({leaf.key for leaf in flat
                          if leaf.key not in available and _main_param_alias(leaf.key) is None})
        if missing:
            raise KeyError(f"{ckpt_dir}: optimizer state missing for {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
        from_model = set()  # main params the checkpoint lacks: taken from the loaded weights
        for leaf in flat:
            if leaf.key not in available:
                alias = _main_param_alias(leaf.key)
                if alias in available:
                    leaf.key = alias  # fp32 main params: 'fp32_param' (local) <-> 'param' (dist)
                else:
                    from_model.add(id(leaf))
        for _, tree in trees:  # dist optimizer: leave them out; its setter copies what loaded
            _prune(tree, lambda leaf: id(leaf) not in from_model)
        request["optimizer_tensors"] = [leaf for leaf in flat if id(leaf) not in from_model]
    leaf_ids = [id(leaf) for leaf in request.get("optimizer_tensors", [])]  # load edits in place
    missing_optional = _drop_missing_optional(request["model"], model_dir)

    with safe_dcp_reading():
        loaded = dist_checkpointing.load(request, model_dir)
    result = unwrap_model(model_chunks[0]).load_state_dict(loaded["model"], strict=strict and not missing_optional)
    if strict and missing_optional:
        unexpected = list(result.unexpected_keys)
        missing = sorted(set(result.missing_keys) - set(missing_optional))
        if missing or unexpected:
            raise RuntimeError(f"{ckpt_dir}: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if weights_only_into is not None:
        for opt in inner_optimizers(weights_only_into):
            opt.reload_model_params()

    if optimizer is not None:
        values = dict(zip(leaf_ids, loaded["optimizer_tensors"], strict=True))
        if from_model:
            # main params <- loaded weights. Only here: a loaded main param may alias the live
            # tensor (torch_dist loads in place), so an unconditional reload would clobber it.
            for opt in inner_optimizers(optimizer):
                opt.reload_model_params()
            for leaf in flat:  # local mixed-precision optimizer: copy the main param onto itself
                if id(leaf) in from_model:
                    values[id(leaf)] = leaf.data
        step = int(meta["optimizer"]["step"])
        for opt, tree in trees:
            state_dict = _replace_leaves(tree, values)
            _set_step(opt, state_dict, step)
            opt.load_state_dict(state_dict)
        _untie_steps(optimizer)
        scaler_state = meta["optimizer"].get("grad_scaler")
        for opt in inner_optimizers(optimizer):
            if scaler_state and getattr(opt, "grad_scaler", None) is not None:
                opt.grad_scaler.load_state_dict(
                    {k: torch.tensor(v) if isinstance(v, float) else v
                     for k, v in scaler_state.items()})
    if scheduler is not None:
        if meta["scheduler"] is None:
            raise ValueError(f"{ckpt_dir} holds no scheduler state")
        scheduler.load_state_dict(meta["scheduler"])

    same_layout = meta["layout"] == _layout()
    rank_state, rng_restored = None, False
    rank_file = ckpt_dir / _RANK_DIR / f"rank_{dist.get_rank():05d}.pt"
    if same_layout and rank_file.is_file():
        saved = torch.load(rank_file, map_location="cpu", weights_only=True)
        rank_state = saved["user"]
        if load_rng:
            _set_rng_state(saved["rng"])
            rng_restored = True
    elif not same_layout:
        logger.info("layout changed %s -> %s: RNG and per-rank state not restored",
                    meta["layout"], _layout())
    dist.barrier()
    return LoadResult(meta["extra"], rank_state, rng_restored, meta["layout"],
                      optimizer is not None, missing_optional)


def _drop_missing_optional(model_request: dict, model_dir: str) -> list:
    """Remove from the (flat) model request the tensors of parameters marked
    `optional_in_checkpoint` when the checkpoint holds none of them (a base model under new LoRA
    adapters); returns their state-dict keys. Holding only some of them is an error."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    optional = {k: v for k, v in model_request.items()
                if isinstance(v, ShardedBase) and getattr(getattr(v, "data", None), "optional_in_checkpoint", False)}
    if not optional:
        return []
    with safe_dcp_reading():
        available = set(dist_checkpointing.load_tensors_metadata(model_dir).keys())
    dropped = sorted(k for k, v in optional.items() if v.key not in available)
    if dropped and len(dropped) < len(optional):  # a checkpoint of other adapters, not a base model
        raise KeyError(f"{model_dir}: holds some of this model's adapter tensors but not {dropped[:5]}"
                       f"{' ...' if len(dropped) > 5 else ''} (LoRA targets changed?)")
    for k in dropped:
        del model_request[k]
    if dropped:
        logger.info("%d optional tensors (e.g. %s) are not in the checkpoint: kept as initialised",
                    len(dropped), dropped[0])
    return dropped


_MAIN_PARAM_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")


def _main_param_alias(key: str) -> str | None:
    """The other name of an fp32 main-param key, or None for non-main-param keys."""
    a, b = _MAIN_PARAM_PREFIXES
    if key.startswith(a):
        return b + key[len(a):]
    if key.startswith(b):
        return a + key[len(b):]
    return None


def _set_step(opt, state_dict: dict, step: int) -> None:
    """Put the checkpoint's Adam step where this optimizer kind's load_state_dict expects it."""
    if _is_distributed(opt):
        for group in state_dict["optimizer"]["param_groups"]:
            group["step"] = step
        return
    inner = state_dict["optimizer"] if "optimizer" in state_dict else state_dict
    inner["state"]["common_step"] = torch.tensor(float(step))


_FORK_QUEUE_SET = False


def _use_fork_results_queue() -> None:
    """On the cpu platform, give megatron's checkpoint writer a results queue from a *fork*
    Manager instead of a spawn one: saves ~4 s per process and avoids re-importing ``__main__``.
    On accelerators megatron's default is kept."""
    global _FORK_QUEUE_SET
    if _FORK_QUEUE_SET:
        return
    from voxcpm_train.platform import current_platform

    try:
        is_cpu = current_platform().is_cpu
    except RuntimeError:
        is_cpu = False
    if is_cpu:
        import torch.multiprocessing as mp
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
    _FORK_QUEUE_SET = True
