"""Deterministic batch planning: dataset blending, layout draws, sequence packing, micro-batch grouping.

The planner turns (seed, blend weights, datasets) into one global stream of micro-batch plans, using
only the small per-sample index (lengths, speakers, text ids) — no audio is read. The stream is cut
into windows of `window_samples` draws; everything in a window depends only on the planner state at the
window's start (a few counters, JSON-serialisable), which makes the stream exactly resumable and
independent of the data-parallel layout (DP rank d takes global micro-batches d, d + dp, ...).

Per window: draw datasets by blend weight; take each dataset's next sample from its per-epoch
permutation; draw a layout (tts / clone / continuation / clone_continuation) and same-speaker
reference / prompt clips; then pack with first-fit-decreasing into rows of `row_tokens` positions
(packing) or group by length under a token budget (no packing); shuffle; group rows into micro-batches.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .config import DataConfig
from .latent_dataset import LatentDataset
from .sequences import LAYOUTS, sequence_length
from .tokenizer import TextTokenizer

MASK64 = (1 << 64) - 1


def row_seed(seed: int, row_index: int) -> int:
    """Flow-matching seed of global row `row_index` (splitmix64 of both), in [0, 2^63)."""
    z = (seed * 0x9E3779B97F4A7C15 + row_index + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class Sample:
    """One planned sequence: dataset `ds`, sample `idx`, layout, reference / prompt sample (-1: none)."""

    ds: int
    idx: int
    layout: str
    ref: int
    prompt: int
    length: int
    text_ids: list

    def to_list(self) -> list:
        return [self.ds, self.idx, self.layout, self.ref, self.prompt, self.length, self.text_ids]

    @classmethod
    def from_list(cls, x: list) -> "Sample":
        return cls(*x)


class BatchPlanner:
    """Stateful generator of micro-batch plans {index, row0, T, rows: [[Sample]]}.

    `state` = {stage, window, cursors, pending, rows, mbs, dropped}: cursors[d] counts the draws made from
    dataset d (epoch = cursor // len, position = cursor % len), pending holds packed rows carried to the
    next window, rows / mbs count rows / micro-batches emitted so far (global indices).
    """

    def __init__(self, datasets: list[LatentDataset], weights: list[float], layout_probs: list[dict],
                 cfg: DataConfig, tokenizer: TextTokenizer):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("one blend weight per dataset, at least one dataset")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"blend weights must be >= 0 with a positive sum, got {weights}")
        self.datasets, self.weights, self.cfg, self.tok = datasets, w / w.sum(), cfg, tokenizer
        self.layout_cdf = []
        for p in layout_probs:
            v = np.asarray([float(p.get(k, 0.0)) for k in LAYOUTS])
            self.layout_cdf.append(np.cumsum(v / v.sum()))
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self.state = {"stage": 0, "window": 0, "cursors": [0] * len(datasets), "pending": [], "rows": 0,
                      "mbs": 0, "dropped": 0}

    # -- sample drawing -----------------------------------------------------------------------------
    def _order(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.datasets):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.cfg.seed, 0xDA7A, d, epoch])
            self._perm_cache[key] = rng.permutation(len(self.datasets[d]))
        return self._perm_cache[key]

    def _context_candidates(self, ds: LatentDataset, idx: int) -> np.ndarray:
        spk = ds.speaker[idx]
        if spk < 0:
            return np.empty(0, np.int64)
        group = ds.by_speaker[spk]
        return group[(group != idx) & (ds.patches[group] <= self.cfg.max_ref_patches)]

    def _draw_sample(self, d: int, idx: int, u: np.ndarray) -> Sample | None:
        ds = self.datasets[d]
        layout = LAYOUTS[int(np.searchsorted(self.layout_cdf[d], u[0], side="right"))]
        if ds.samples[idx].get("description"):   # voice design: description + text, no continuation
            layout = {"continuation": "tts", "clone_continuation": "clone"}.get(layout, layout)
        cand = self._context_candidates(ds, idx)
        if len(cand) == 0:
            layout = "tts"
        ref = prompt = -1
        if layout in ("clone", "clone_continuation"):
            ref = int(cand[int(u[1] * len(cand))])
        if layout in ("continuation", "clone_continuation"):
            pool = cand[cand != ref] if len(cand) > 1 else cand
            prompt = int(pool[int(u[2] * len(pool))])
        a = int(ds.patches[idx])
        r = int(ds.patches[ref]) if ref >= 0 else 0
        q = int(ds.patches[prompt]) if prompt >= 0 else 0
        if prompt >= 0:  # the reference tokenizes prompt_text + text as one string
            text_ids = self.tok(ds.samples[prompt]["text"] + ds.samples[idx]["text"])
        else:
            text_ids = ds.text_ids(idx)
        length = sequence_length(layout, len(text_ids), a, r, q)
        if length > self.cfg.row_tokens and layout != "tts":
            layout, ref, prompt, text_ids = "tts", -1, -1, ds.text_ids(idx)
            length = sequence_length("tts", len(text_ids), a)
        if length > self.cfg.row_tokens:
            return None
        return Sample(d, int(idx), layout, ref, prompt, length, list(map(int, text_ids)))

    def _draw_window(self, rng: np.random.Generator) -> list[Sample]:
        n = self.cfg.window_samples
        picks = rng.choice(len(self.datasets), size=n, p=self.weights)
        u = rng.random((n, 3))
        out = []
        for k, d in enumerate(picks):
            c = self.state["cursors"][d]
            self.state["cursors"][d] = c + 1
            size = len(self.datasets[d])
            s = self._draw_sample(int(d), int(self._order(int(d), c // size)[c % size]), u[k])
            if s is None:
                self.state["dropped"] += 1
            else:
                out.append(s)
        return out

    # -- grouping -----------------------------------------------------------------------------------
    def _pack_rows(self, samples: list[Sample]) -> list[list[Sample]]:
        """First-fit decreasing into rows of `row_tokens` positions."""
        cap = self.cfg.row_tokens
        order = sorted(range(len(samples)), key=lambda i: (-samples[i].length, i))
        free = np.empty(0, np.int64)
        rows: list[list[Sample]] = []
        for i in order:
            L = samples[i].length
            fits = np.flatnonzero(free >= L)
            if len(fits):
                j = int(fits[0])
                free[j] -= L
                rows[j].append(samples[i])
            else:
                rows.append([samples[i]])
                free = np.append(free, cap - L)
        return rows

    def _bucket_batches(self, samples: list[Sample]) -> list[list[list[Sample]]]:
        """No packing: sort by length, greedy micro-batches with rows x padded length <= token_budget."""
        m = self.cfg.pad_to_multiple
        order = sorted(samples, key=lambda s: s.length)
        mbs, cur = [], []
        for s in order:
            padded = -(-s.length // m) * m
            if cur and (len(cur) + 1) * padded > self.cfg.token_budget:
                mbs.append([[x] for x in cur])
                cur = []
            cur.append(s)
        if cur:
            mbs.append([[x] for x in cur])
        return mbs

    def next_window(self) -> tuple[dict, list[dict]]:
        """Plan one window. Returns (state snapshot before it, micro-batch plans)."""
        snapshot = copy.deepcopy(self.state)
        st = self.state
        rng = np.random.default_rng([self.cfg.seed, 0x9AC4, st["stage"], st["window"]])
        samples = self._draw_window(rng)
        if self.cfg.packing:
            rows = self._pack_rows(samples)
            rows = [rows[i] for i in rng.permutation(len(rows))]
            rows = [[Sample.from_list(x) for x in r] for r in st["pending"]] + rows
            k = self.cfg.rows_per_microbatch
            n_full = len(rows) // k * k
            groups = [rows[i:i + k] for i in range(0, n_full, k)]
            st["pending"] = [[x.to_list() for x in r] for r in rows[n_full:]]
        else:
            groups = self._bucket_batches(samples)
            groups = [groups[i] for i in rng.permutation(len(groups))]
        plans = []
        for rows in groups:
            if self.cfg.packing:
                T = self.cfg.row_tokens
            else:
                T = -(-max(s.length for r in rows for s in r) // self.cfg.pad_to_multiple) * self.cfg.pad_to_multiple
            plans.append({"index": st["mbs"], "row0": st["rows"], "T": T, "rows": rows})
            st["mbs"] += 1
            st["rows"] += len(rows)
        st["window"] += 1
        return snapshot, plans

    def load_state(self, state: dict) -> None:
        self.state = copy.deepcopy(state)
