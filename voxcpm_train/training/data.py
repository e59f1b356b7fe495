"""The loop's view of data_pipeline: this rank's micro-batch stream (with the stage's blend), its state,
the count of real positions served (for tokens/s), and a fixed validation set."""
from __future__ import annotations

import copy
import dataclasses


from voxcpm_train.config.model import ConfigError


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


class TrainData:
    """Iterator of this rank's micro-batches (every rank of a DP group reads the same ones)."""

    def __init__(self, job, dp_rank: int, dp_size: int, seed_offset: int = 0):
        from data_pipeline.loader import VoxCPMDataLoader

        cfg = data_config(job)
        if seed_offset:
            cfg = dataclasses.replace(cfg, seed=cfg.seed + seed_offset)
        self.cfg = cfg
        self.seq_length = int(cfg.row_tokens)
        self.loader = VoxCPMDataLoader(cfg, dp_rank, dp_size, weights=blend_weights(job))
        n_tok = len(self.loader.tokenizer.hf)
        if n_tok > job.model.vocab_size:
            raise ConfigError(f"model.vocab_size={job.model.vocab_size} is smaller than the {n_tok} tokens of "
                              f"data.tokenizer_path={cfg.tokenizer_path}")
        if cfg.row_tokens > job.model.max_length:
            raise ConfigError(f"data.row_tokens={cfg.row_tokens} exceeds model.max_length={job.model.max_length}")
        self.positions = 0
        self.segments = 0          # packed samples (utterances) served

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.loader)
        seg = batch.get("segment_ids")
        self.positions += int((seg > 0).sum()) if seg is not None else batch["text_mask"].numel()
        self.segments += int(seg.max(dim=1).values.sum()) if seg is not None else int(batch["text_mask"].shape[0])
        return batch

    def position_counter(self) -> int:
        return self.positions

    def segment_counter(self) -> int:
        return self.segments

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def build_data(job, dp_rank: int, dp_size: int) -> TrainData:
    return TrainData(job, dp_rank, dp_size)


def validation_batches(job, dp_rank: int, dp_size: int, n: int) -> list:
    """A fixed list of `n` micro-batches of this rank, drawn with data.seed + 1 (same every call)."""
    data = TrainData(job, dp_rank, dp_size, seed_offset=1)
    data.loader.num_workers = 0
    return [next(data) for _ in range(n)]
