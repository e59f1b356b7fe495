"""The training loader: data-parallel aware, multi-worker, deterministic, exactly resumable.

    loader = VoxCPMDataLoader(cfg, dp_rank, dp_size)         # on the ranks that read (TP rank 0)
    batch = next(loader)                                     # micro-batch dict (docs/architecture.md)
    ckpt["data"] = loader.state_dict()                       # JSON-serialisable
    loader.load_state_dict(ckpt["data"])                     # in a fresh process: same next batches

Planning (which samples form which rows) runs in the main process on the small index (packing.py);
workers only read latents and assemble tensors. DP rank d takes global micro-batches d, d+dp, ...;
the state counts global micro-batches, so it restores at any DP size (see docs/data.md).
"""
from __future__ import annotations

import bisect
import copy
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig, LayoutProbs, to_dict as _as_dict
from .latent_dataset import LatentDataset
from .packing import OWN_REF, BatchPlanner, row_seed
from .sequences import build_sequence
from .tokenizer import TextTokenizer

STATE_VERSION = 1


class MicroBatchAssembler(Dataset):
    """Plan -> micro-batch tensors. Runs in loader workers; reads latents, deterministic."""

    def __init__(self, datasets: list[LatentDataset], cfg: DataConfig):
        self.datasets, self.cfg = datasets, cfg

    def __len__(self):  # plans come from the sampler; length is unbounded
        return 1 << 62

    def __getitem__(self, plan: dict) -> dict[str, torch.Tensor]:
        cfg, rows, T = self.cfg, plan["rows"], plan["T"]
        B, P, D = len(rows), cfg.patch_size, cfg.latent_dim
        out = {
            "text_tokens": np.zeros((B, T), np.int64), "text_mask": np.zeros((B, T), np.float32),
            "audio_feats": np.zeros((B, T, P, D), np.float32), "audio_mask": np.zeros((B, T), np.float32),
            "loss_mask": np.zeros((B, T), np.float32), "labels": np.zeros((B, T), np.int64),
            "position_ids": np.zeros((B, T), np.int64), "segment_ids": np.zeros((B, T), np.int64),
        }
        for b, row in enumerate(rows):
            pos = 0
            for seg, s in enumerate(row, 1):
                ds = self.datasets[s.ds]
                ref = ds.ref_latent(s.idx) if s.ref == OWN_REF else ds.latent(s.ref) if s.ref >= 0 else None
                text_ids = s.text_ids if s.text_ids is not None else ds.text_ids(s.idx)
                seq = build_sequence(text_ids, ds.latent(s.idx), P, ref=ref,
                                     prompt=ds.latent(s.prompt) if s.prompt >= 0 else None)
                L = len(seq["text_tokens"])
                if L != s.length:
                    raise RuntimeError(f"sample {ds.key(s.idx)} of {ds.path}: built {L} positions, "
                                       f"planned {s.length} (index out of date?)")
                for k, v in seq.items():
                    out[k][b, pos:pos + L] = v
                out["position_ids"][b, pos:pos + L] = np.arange(L)
                out["segment_ids"][b, pos:pos + L] = seg
                pos += L
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        batch["row_seeds"] = torch.tensor([row_seed(cfg.seed, plan["row0"] + b) for b in range(B)], dtype=torch.int64)
        return batch


class PlanSampler(Sampler):
    """Yields this rank's plans from a start point; records, per window, the planner snapshot at its start
    and its micro-batches' first rows, and the planner state after it (main process)."""

    def __init__(self, loader: "VoxCPMDataLoader"):
        self.loader = loader

    def __iter__(self) -> Iterator[dict]:
        ld = self.loader
        planner, start = ld.planner, ld._start_global
        planner.load_state(ld._start_snapshot)
        empty = 0
        while True:
            snap, plans = planner.next_window()
            ld._windows.append((snap["mbs"], snap, [p["row0"] for p in plans]))
            ld._after_windows = copy.deepcopy(planner.state)
            if plans:
                empty = 0
            else:
                empty += 1
                if empty > 100:
                    raise RuntimeError("the planner produces no micro-batches (every sample longer than row_tokens?)")
            for p in plans:
                g = p["index"]
                if g >= start and (g - start) % ld.dp_size == ld.dp_rank:
                    yield p


class VoxCPMDataLoader:
    """Iterator of micro-batches for one DP rank with `state_dict()` / `load_state_dict()`."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, weights: list[float] | None = None,
                 num_workers: int | None = None):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.tokenizer = TextTokenizer(cfg.tokenizer_path)
        specs = [_as_dict(d) for d in cfg.datasets]
        self.names = [s["name"] for s in specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"dataset names must be unique: {self.names}")
        self.datasets = [LatentDataset(s["path"], self.tokenizer, cfg.patch_size, filter=s.get("filter"), name=s["name"])
                         for s in specs]
        self.filters = [d.filter for d in self.datasets]      # canonical: {} = every sample of the folder
        self.weights = list(weights) if weights is not None else [float(s.get("weight", 1.0)) for s in specs]
        layouts = [_as_dict(s.get("layouts") or LayoutProbs()) for s in specs]
        self._layouts = layouts
        self.planner = BatchPlanner(self.datasets, self.weights, layouts, cfg, self.tokenizer)
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        self._start_snapshot = copy.deepcopy(self.planner.state)
        self._start_global = 0
        self._consumed = 0          # micro-batches this rank has returned since the start point
        self._windows: list[tuple[int, dict, list[int]]] = []    # (first micro-batch, snapshot, row0s)
        self._after_windows: dict | None = None                    # planner state after the last window
        self._it = None

    # -- iteration ----------------------------------------------------------------------------------
    def _make_iter(self):
        self._windows, self._after_windows = [], None
        dl = DataLoader(MicroBatchAssembler(self.datasets, self.cfg), sampler=PlanSampler(self), batch_size=None,
                        num_workers=self.num_workers, persistent_workers=False,
                        prefetch_factor=self.cfg.prefetch_factor if self.num_workers > 0 else None)
        return iter(dl)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._make_iter()
        batch = next(self._it)
        self._consumed += 1
        return batch

    # -- checkpointing ------------------------------------------------------------------------------
    def _next_global(self) -> int:
        """Global micro-batches consumed by all ranks together (ranks advance in lockstep)."""
        return self._start_global + self._consumed * self.dp_size

    def state_dict(self) -> dict:
        """The position of the next micro-batch g: the snapshot of the window holding it and its first row,
        looked up in what the sampler recorded (no re-planning unless g lies beyond it)."""
        g = self._next_global()
        snap, row = self._start_snapshot, None
        if self._windows:
            i = bisect.bisect_right([w[0] for w in self._windows], g) - 1
            if i >= 0:
                first, snap, row0s = self._windows[i]
                del self._windows[:i]      # older windows are never needed again
                if g - first < len(row0s):
                    row = row0s[g - first]
        after = self._after_windows
        if row is None and after is not None and after["mbs"] == g:
            snap, row = after, after["rows"]    # g opens the next (not yet planned) window
        if row is None:
            row = self._row_of(snap, g)
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "datasets": self.names, "weights": self.weights,
                "next_global_microbatch": g, "next_row": row, "planner": copy.deepcopy(snap),
                "dataset_sizes": [len(d) for d in self.datasets], "filters": copy.deepcopy(self.filters)}

    def _row_of(self, snap: dict, g: int) -> int:
        """Global row index of micro-batch g (replays at most the windows from `snap` up to g)."""
        p = BatchPlanner(self.datasets, self.weights, self._layouts, self.cfg, self.tokenizer)
        p.load_state(snap)
        while p.state["mbs"] <= g:
            _, plans = p.next_window()
            for plan in plans:
                if plan["index"] == g:
                    return plan["row0"]
        return p.state["rows"] if p.state["mbs"] == g else snap["rows"]

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off (any DP size). If the blend (weights, dataset list or a
        dataset's sample filter) differs — a curriculum stage switch — continue each dataset from the
        window's start cursors with the new weights (at most one window of samples is revisited); a dataset
        that is new or whose filter changed starts from cursor 0 (it is another sample set)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} != {STATE_VERSION}")
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"data loader state has seed {state['seed']}, config has {self.cfg.seed}")
        snap, g = copy.deepcopy(state["planner"]), int(state["next_global_microbatch"])
        same_blend = (state["datasets"] == self.names and np.allclose(state["weights"], self.weights)
                      and self._saved_filters(state) == self.filters)
        if same_blend:
            sizes = [len(d) for d in self.datasets]
            if state.get("dataset_sizes", sizes) != sizes:
                raise ValueError(f"datasets changed size since the checkpoint: {state['dataset_sizes']} -> {sizes}")
        else:
            snap = self._stage_switch(state, snap, g)
        self._start_snapshot, self._start_global = snap, g
        self._consumed, self._windows, self._after_windows, self._it = 0, [], None, None

    @staticmethod
    def _saved_filters(state: dict) -> list[dict]:
        """The filters of a saved state (states written before filters existed: no filter)."""
        return state.get("filters") or [{} for _ in state["datasets"]]

    def _stage_switch(self, state: dict, snap: dict, g: int) -> dict:
        old = {n: (i, f) for i, (n, f) in enumerate(zip(state["datasets"], self._saved_filters(state)))}
        cursors = [snap["cursors"][old[n][0]] if n in old and old[n][1] == f else 0
                   for n, f in zip(self.names, self.filters)]
        return {"stage": snap.get("stage", 0) + 1, "window": 0, "cursors": cursors, "pending": [],
                "rows": int(state["next_row"]), "mbs": g, "dropped": snap.get("dropped", 0)}

    def set_blend(self, weights: list[float]) -> None:
        """Curriculum: change the blend from the next micro-batch on (as load_state_dict of a new blend)."""
        state = self.state_dict()
        self.weights = list(weights)
        self.planner = BatchPlanner(self.datasets, self.weights, self._layouts, self.cfg, self.tokenizer)
        self.load_state_dict(state)
