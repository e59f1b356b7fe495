"""The loop's view of data_pipeline: this rank's micro-batch stream (with the stage's blend), its state,
the count of real positions served (for tokens/s), and a fixed validation set.

Who reads (megatron style): in each tensor-parallel group only TP rank 0 builds and iterates a loader; it
sends every micro-batch to the other TP ranks over the TP group (`TPBatchBroadcast`). Every pipeline stage
reads its own copy (each stage needs the masks, positions and segments of the micro-batch; a broadcast
across stages would tie the stages of a 1F1B schedule together), so a (DP, PP) position reads once
instead of TP times. The loader state counts global micro-batches, so it is
the same on every reader of a DP group; `state_dict()` hands the reader's to its TP group, so every rank
returns the same state.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from voxcpm_train.config.model import ConfigError
from voxcpm_train.training.flops import BatchShape, training_flops


def reads_data(tp_rank: int) -> bool:
    """Whether this rank builds a loader: TP rank 0 of every (DP, PP) position."""
    return tp_rank == 0


class TPBatchBroadcast:
    """Micro-batch dicts from the TP group's source rank to the others (3 broadcasts per micro-batch: the
    shapes, then one flat buffer per dtype; the keys/dtypes are sent once, as megatron's broadcast_data
    assumes fixed keys). Tensors arrive on `device` (the communication device: CPU with gloo, the
    accelerator with NCCL/HCCL)."""

    def __init__(self, group, src: int, is_src: bool, device):
        self.group, self.src, self.is_src, self.device = group, src, is_src, device
        self.layout = None        # [(key, dtype, ndim)], fixed after the first micro-batch

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.broadcast(t, src=self.src, group=self.group)
        return t

    def __call__(self, batch: dict | None) -> dict:
        import torch.distributed as dist

        if self.layout is None:
            obj = [[(k, str(v.dtype).replace("torch.", ""), v.dim()) for k, v in batch.items()]
                   if self.is_src else None]
            dist.broadcast_object_list(obj, src=self.src, group=self.group)
            self.layout = [(k, getattr(torch, d), n) for k, d, n in obj[0]]
        if self.is_src:
            if [k for k, _, _ in self.layout] != list(batch):
                raise RuntimeError(f"micro-batch keys changed: {list(batch)} vs {[k for k, _, _ in self.layout]}")
            shapes = torch.tensor([x for k, _, _ in self.layout for x in batch[k].shape], dtype=torch.int64)
        else:
            shapes = torch.empty(sum(n for _, _, n in self.layout), dtype=torch.int64)
        shapes = self._bcast(shapes.to(self.device)).tolist()
        dims, i = {}, 0
        for k, _, n in self.layout:
            dims[k], i = shapes[i:i + n], i + n
        out = {}
        for dtype in dict.fromkeys(d for _, d, _ in self.layout):     # first-seen order: same everywhere
            keys = [k for k, d, _ in self.layout if d == dtype]
            numels = [int(torch.Size(dims[k]).numel()) for k in keys]
            if self.is_src:
                flat = torch.cat([batch[k].reshape(-1).to(self.device) for k in keys])
            else:
                flat = torch.empty(sum(numels), dtype=dtype, device=self.device)
            flat = self._bcast(flat)
            for k, part in zip(keys, torch.split(flat, numels)):
                out[k] = part.view(dims[k]) if not self.is_src else batch[k]
        return out if not self.is_src else batch


def _names(data_cfg) -> list:
    return [d["name"] if isinstance(d, dict) else d.name for d in data_cfg.datasets]


def blend_weights(job) -> list | None:
    """Blend weights of the stage over data.datasets (None = the data config's own weights)."""
    blend = dict(job.stage.blend)
    if not blend:
        return None
    names = _names(job.data)
    for name in blend:
        if name not in names:
            raise ConfigError(f"stage.blend.{name}: no dataset named {name!r} in data.datasets {names}")
    w = [float(blend.get(n, 0.0)) for n in names]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"stage.blend={blend}: weights must be >= 0 with a positive sum")
    return w


def data_config(job):
    """data config with the rows per micro-batch taken from parallel.micro_batch_size."""
    cfg = copy.deepcopy(job.data)
    mbs = job.parallel.micro_batch_size
    if getattr(cfg, "packing", True):
        cfg = dataclasses.replace(cfg, rows_per_microbatch=mbs) if dataclasses.is_dataclass(cfg) else cfg
    elif job.parallel.pp > 1:
        raise ConfigError("data.packing=false gives micro-batches of varying shape; parallel.pp > 1 needs "
                          "data.packing=true")
    return cfg


def _tp_context():
    """(tp_rank, tp_size, group, src global rank, comm device); a world without megatron state is TP=1."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            from voxcpm_train.parallel.state import comm_device

            return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                    ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank(), comm_device())
    except ImportError:
        pass
    return 0, 1, None, 0, torch.device("cpu")


class TrainData:
    """Iterator of this rank's micro-batches (every rank of a DP group gets the same ones; only TP rank 0
    reads them, the other TP ranks receive them). `__next__`, `state_dict()` and the constructor are
    collective over the TP group when TP > 1."""

    def __init__(self, job, dp_rank: int, dp_size: int, seed_offset: int = 0):
        from data_pipeline.index import IndexNotReady
        from data_pipeline.loader import VoxCPMDataLoader

        cfg = data_config(job)
        if seed_offset:
            cfg = dataclasses.replace(cfg, seed=cfg.seed + seed_offset)
        self.cfg = cfg
        self.seq_length = int(cfg.row_tokens)
        if cfg.row_tokens > job.model.max_length:
            raise ConfigError(f"data.row_tokens={cfg.row_tokens} exceeds model.max_length={job.model.max_length}")
        tp_rank, self.tp_size, group, src, device = _tp_context()
        self.is_reader = reads_data(tp_rank)
        try:
            self.loader = VoxCPMDataLoader(cfg, dp_rank, dp_size, weights=blend_weights(job)) if self.is_reader else None
        except IndexNotReady as err:      # a large folder encoded before the columnar index: one line, the command
            raise ConfigError(f"data.datasets: {err}") from None
        self._bcast = TPBatchBroadcast(group, src, self.is_reader, device) if self.tp_size > 1 else None
        n_tok = len(self.loader.tokenizer.hf) if self.is_reader else 0
        if self._bcast is not None:      # every TP rank raises the same error (none waits for a reader that left)
            import torch.distributed as dist

            t = torch.tensor([n_tok], dtype=torch.int64, device=device)
            dist.broadcast(t, src=src, group=group)
            n_tok = int(t.item())
        if n_tok > job.model.vocab_size:
            raise ConfigError(f"model.vocab_size={job.model.vocab_size} is smaller than the {n_tok} tokens of "
                              f"data.tokenizer_path={cfg.tokenizer_path}")
        self.model_cfg = job.model
        self.positions = 0
        self.segments = 0          # packed samples (utterances) served
        self.model_flops = 0       # training FLOPs of the micro-batches served (readers only: CPU batches)
        self.reads = 0             # micro-batches this rank read from its own loader

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = None
        if self.is_reader:
            batch = next(self.loader)
            self.reads += 1
            self.model_flops += training_flops(self.model_cfg, BatchShape.of_batch(batch))
        if self._bcast is not None:
            batch = self._bcast(batch)
        seg = batch.get("segment_ids")
        self.positions += int((seg > 0).sum()) if seg is not None else batch["text_mask"].numel()
        self.segments += int(seg.max(dim=1).values.sum()) if seg is not None else int(batch["text_mask"].shape[0])
        return batch

    def position_counter(self) -> int:
        return self.positions

    def segment_counter(self) -> int:
        return self.segments

    def flops_counter(self) -> int:
        """Model FLOPs (fwd + bwd, `training.flops`) of the micro-batches read here; 0 on non-readers."""
        return self.model_flops

    def state_dict(self) -> dict:
        """The loader state (JSON-serialisable), the reader's on every rank of the TP group."""
        state = [self.loader.state_dict() if self.is_reader else None]
        if self._bcast is not None:
            import torch.distributed as dist

            dist.broadcast_object_list(state, src=self._bcast.src, group=self._bcast.group)
        return state[0]

    def load_state_dict(self, state: dict) -> None:
        if self.is_reader:
            self.loader.load_state_dict(state)


def build_data(job, dp_rank: int, dp_size: int) -> TrainData:
    return TrainData(job, dp_rank, dp_size)


def validation_job(job):
    """The job whose data is the validation set: `data.validation_path` (held out: one dataset with the
    layouts of datasets[0], no stage blend), else the training datasets themselves (not held out)."""
    path = getattr(job.data, "validation_path", None)
    if not path:
        return job
    first = job.data.datasets[0]
    layouts = first.get("layouts") if isinstance(first, dict) else first.layouts
    val = copy.copy(job)
    val.data = dataclasses.replace(job.data, datasets=[{"name": "validation", "path": path, "weight": 1.0,
                                                        "layouts": layouts}])
    val.stage = dataclasses.replace(job.stage, blend={})
    return val


def validation_batches(job, dp_rank: int, dp_size: int, n: int) -> list:
    """A fixed list of `n` micro-batches of this rank, drawn with data.seed + 1 (same every call), from
    `validation_job(job)`'s data. The training stream is not touched (its own loader, state and cursors)."""
    import logging

    held_out = bool(getattr(job.data, "validation_path", None))
    logging.getLogger("voxcpm_train").info(
        f"validation: {n} micro-batches per rank from " + (f"data.validation_path={job.data.validation_path} "
        "(held out)" if held_out else "the training datasets (data.seed + 1; not held out: set "
        "data.validation_path for a held-out set)"))
    data = TrainData(validation_job(job), dp_rank, dp_size, seed_offset=1)
    if data.loader is not None:
        data.loader.num_workers = 0
    return [next(data) for _ in range(n)]
