"""Deterministic batch planning: dataset blending, layout draws, sequence packing, micro-batch grouping.

The planner turns (seed, blend weights, datasets) into one global stream of micro-batch plans, using
only the small per-sample index (lengths, speakers, text ids) — no audio is read. The stream is cut
into windows of `window_samples` draws; everything in a window depends only on the planner state at the
window's start (a few counters, JSON-serialisable), which makes the stream exactly resumable and
independent of the data-parallel layout (DP rank d takes global micro-batches d, d + dp, ...).

Per window: draw datasets by blend weight; take each dataset's next sample from its per-epoch
permutation; draw a layout (tts / clone / continuation / clone_continuation) and the reference (the
sample's own clip, or a same-speaker one) / prompt clips; then pack with first-fit-decreasing into rows of `row_tokens` positions
(packing) or group by length under a token budget (no packing); shuffle; group rows into micro-batches.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .config import DataConfig
from .latent_dataset import LatentDataset
from .sequences import LAYOUTS, sequence_lengths
from .tokenizer import TextTokenizer

MASK64 = (1 << 64) - 1


def row_seed(seed: int, row_index: int) -> int:
    """Flow-matching seed of global row `row_index` (splitmix64 of both), in [0, 2^63)."""
    z = (seed * 0x9E3779B97F4A7C15 + row_index + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 1


OWN_REF = -2     # Sample.ref: the sample's own reference clip (its manifest `ref_audio`)


@dataclass
class Sample:
    """One planned sequence: dataset `ds`, sample `idx`, layout, reference / prompt sample (-1: none;
    ref `OWN_REF`: the sample's own reference clip), positions, and `text_ids`: the ids of prompt_text + text
    for continuation layouts, None for the others (the sample's stored ids, read when the batch is
    assembled: planning reads only token counts, so a rank never touches the ids of other ranks' batches)."""

    ds: int
    idx: int
    layout: str
    ref: int
    prompt: int
    length: int
    text_ids: list | None

    def to_list(self) -> list:
        return [self.ds, self.idx, self.layout, self.ref, self.prompt, self.length, self.text_ids]

    @classmethod
    def from_list(cls, x: list) -> "Sample":
        return cls(*x)


class _ContextTable:
    """Per dataset: the clips usable as reference / prompt (other samples of the same speaker of at most
    `max_ref_patches` patches), as a CSR over speakers. For speaker s: `clips[bounds[s]:bounds[s + 1]]`
    (ascending); `pos[i]`: sample i's position within its speaker's clips (-1: not a clip)."""

    def __init__(self, ds: LatentDataset, max_ref_patches: int):
        order, bounds = ds.by_speaker.order, ds.by_speaker.bounds
        ok = ds.patches[order] <= max_ref_patches
        self.clips = np.asarray(order[ok], dtype=np.int32 if len(ds) < 2 ** 31 else np.int64)
        c = np.zeros(len(ok) + 1, np.int64)
        np.cumsum(ok, out=c[1:])
        self.bounds = c[bounds]
        self.pos = np.full(len(ds), -1, np.int32 if len(ds) < 2 ** 31 else np.int64)
        if len(self.clips):
            self.pos[self.clips] = np.arange(len(self.clips)) - self.bounds[ds.speaker[self.clips]]

    def count(self, spk: np.ndarray) -> np.ndarray:
        if len(self.bounds) < 2:          # no speaker at all (e.g. a manifest without a speaker column)
            return np.zeros(len(spk), np.int64)
        s = np.maximum(spk, 0)
        return np.where(spk >= 0, self.bounds[s + 1] - self.bounds[s], 0)

    def pick(self, valid: np.ndarray, spk: np.ndarray, k: np.ndarray, skip_a: np.ndarray,
             skip_b: np.ndarray) -> np.ndarray:
        """Where `valid`: the k-th clip of the speaker with positions `skip_a` / `skip_b` left out (-1:
        none left out), i.e. `clips_of_speaker[mask][k]`; -1 elsewhere."""
        big = np.int64(np.iinfo(np.int64).max)
        skip_a, skip_b = np.asarray(skip_a, np.int64), np.asarray(skip_b, np.int64)
        a = np.where(skip_a >= 0, skip_a, big)
        b = np.where(skip_b >= 0, skip_b, big)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        k = k + (k >= lo)
        k = k + (k >= hi)
        at = np.where(valid, self.bounds[np.maximum(spk, 0)] + k, 0)
        return np.where(valid, self.clips[at] if len(self.clips) else -1, -1)


class BatchPlanner:
    """Stateful generator of micro-batch plans {index, row0, T, rows: [[Sample]]}.

    `state` = {stage, window, cursors, pending, rows, mbs, dropped}: cursors[d] counts the draws made from
    dataset d (epoch = cursor // len, position = cursor % len), pending holds packed rows carried to the
    next window, rows / mbs count rows / micro-batches emitted so far (global indices). The draws of a
    window are computed on the datasets' arrays at once (vectorized); only text ids are per sample.
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
        self._context: dict[int, _ContextTable] = {}
        self.state = {"stage": 0, "window": 0, "cursors": [0] * len(datasets), "pending": [], "rows": 0,
                      "mbs": 0, "dropped": 0}

    # -- sample drawing -----------------------------------------------------------------------------
    def _order(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.datasets):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.cfg.seed, 0xDA7A, d, epoch])
            perm = rng.permutation(len(self.datasets[d]))
            self._perm_cache[key] = perm.astype(np.int32) if len(perm) < 2 ** 31 else perm
        return self._perm_cache[key]

    def _table(self, d: int) -> _ContextTable:
        if d not in self._context:
            self._context[d] = _ContextTable(self.datasets[d], self.cfg.max_ref_patches)
        return self._context[d]

    def _draw_dataset(self, d: int, idx: np.ndarray, u: np.ndarray) -> tuple:
        """Layouts, reference / prompt clips and lengths of dataset d's draws `idx` (uniforms `u` [n, 3]).

        Per draw: the layout drawn from the dataset's mixture; voice design (a description) allows no
        continuation; reference: the sample's own clip (manifest `ref_audio`) if it has one, else another
        utterance of its speaker; prompt: another utterance of its speaker (not the reference, when there
        are two); an unavailable layout falls back (continuation -> tts, clone_continuation -> clone with
        an own reference, else tts); a sequence longer than a row falls back to tts, and is dropped
        (length -1) if even that does not fit. Returns (layout codes, ref, prompt, length, joined text
        ids per draw (None: the sample's stored ids))."""
        ds, tab, cfg = self.datasets[d], self._table(d), self.cfg
        TTS, CLONE, CONT, BOTH = range(4)
        lay = np.minimum(np.searchsorted(self.layout_cdf[d], u[:, 0], side="right"), BOTH)
        desc = np.asarray(ds.has_description[idx], dtype=bool)
        lay = np.where(desc & (lay == CONT), TTS, np.where(desc & (lay == BOTH), CLONE, lay))
        spk = np.asarray(ds.speaker[idx], dtype=np.int64)
        self_pos = np.where(spk >= 0, tab.pos[idx], -1).astype(np.int64)
        ncand = tab.count(spk) - (self_pos >= 0)
        own = (np.asarray(ds.ref_patches[idx], dtype=np.int64) if ds.ref_patches is not None
               else np.zeros(len(idx), np.int64))
        has_own = own > 0
        none = ncand == 0
        lay = np.where(none & ~has_own, TTS, lay)
        lay = np.where(none & has_own & (lay == CONT), TTS, np.where(none & has_own & (lay == BOTH), CLONE, lay))
        wants_ref, wants_prompt = (lay == CLONE) | (lay == BOTH), (lay == CONT) | (lay == BOTH)
        drawn_ref = wants_ref & ~has_own
        ref = np.where(wants_ref & has_own, OWN_REF, -1).astype(np.int64)
        k_ref = (u[:, 1] * ncand).astype(np.int64)
        ref_clip = tab.pick(drawn_ref, spk, k_ref, self_pos, np.full(len(idx), -1))
        ref = np.where(drawn_ref, ref_clip, ref)
        two = drawn_ref & (ncand > 1)          # the prompt is another clip than the reference
        ref_pos = np.where(two, tab.pos[np.maximum(ref_clip, 0)].astype(np.int64), -1)
        pool = np.where(two, ncand - 1, ncand)
        k_prompt = (u[:, 2] * pool).astype(np.int64)
        prompt = tab.pick(wants_prompt, spk, k_prompt, self_pos, ref_pos)
        a = ds.patches[idx].astype(np.int64)
        r = np.where(wants_ref, np.where(has_own, own, ds.patches[np.maximum(ref, 0)]), 0)
        q = np.where(wants_prompt, ds.patches[np.maximum(prompt, 0)], 0)
        n_own = np.asarray(ds.n_text(idx), dtype=np.int64)
        n_text = n_own.copy()
        joined: list = [None] * len(idx)
        cont = np.flatnonzero(wants_prompt)
        if len(cont):       # the reference tokenizes prompt_text + text as one string
            ids = self.tok.batch([p + t for p, t in zip(ds.plain_texts(prompt[cont]), ds.plain_texts(idx[cont]))])
            for k, x in zip(cont.tolist(), ids):
                joined[k] = x
                n_text[k] = len(x)
        length = sequence_lengths(n_text, a, r, q, wants_ref)
        back = (length > cfg.row_tokens) & (lay != TTS)
        lay = np.where(back, TTS, lay)
        ref, prompt = np.where(back, -1, ref), np.where(back, -1, prompt)
        length = np.where(back, sequence_lengths(n_own, a), length)
        for k in np.flatnonzero(back & wants_prompt):
            joined[k] = None
        length = np.where(length > cfg.row_tokens, -1, length)
        return lay, ref, prompt, length, joined

    def _draw_window(self, rng: np.random.Generator) -> list[Sample]:
        n = self.cfg.window_samples
        picks = rng.choice(len(self.datasets), size=n, p=self.weights)
        u = rng.random((n, 3))
        idx, lay, ref, prompt, length = (np.empty(n, np.int64) for _ in range(5))
        joined: list = [None] * n
        for d in np.unique(picks).tolist():
            pos = np.flatnonzero(picks == d)
            c = self.state["cursors"][d] + np.arange(len(pos), dtype=np.int64)
            self.state["cursors"][d] = int(self.state["cursors"][d] + len(pos))
            size = len(self.datasets[d])
            epoch = c // size
            for e in np.unique(epoch).tolist():
                m = epoch == e
                idx[pos[m]] = self._order(d, e)[c[m] % size]
            lay[pos], ref[pos], prompt[pos], length[pos], jd = self._draw_dataset(d, idx[pos], u[pos])
            for j, x in zip(pos.tolist(), jd):
                joined[j] = x
        kept = np.flatnonzero(length >= 0)
        self.state["dropped"] += int(n - len(kept))
        out = []
        for j, d, i, la, r, q, L in zip(kept.tolist(), picks[kept].tolist(), idx[kept].tolist(), lay[kept].tolist(),
                                        ref[kept].tolist(), prompt[kept].tolist(), length[kept].tolist()):
            out.append(Sample(d, i, LAYOUTS[la], r, q, L, joined[j]))
        return out

    # -- grouping -----------------------------------------------------------------------------------
    def _pack_rows(self, samples: list[Sample]) -> list[list[Sample]]:
        """First-fit decreasing into rows of `row_tokens` positions (ties in draw order). Samples of equal
        length are placed together: first fit puts a run of equal items into the first row that holds
        one until it is full, then the next, then new rows — the same rows as one item at a time."""
        cap = self.cfg.row_tokens
        lengths = np.fromiter((x.length for x in samples), np.int64, len(samples))
        order = np.lexsort((np.arange(len(samples)), -lengths))
        sl = lengths[order]
        starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]]) if len(sl) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(sl)].astype(np.int64)
        free = np.zeros(len(samples), np.int64)           # free positions of row j (first n_rows used)
        rows: list[list[Sample]] = []
        for a, b in zip(starts.tolist(), ends.tolist()):
            L, items = int(sl[a]), [samples[i] for i in order[a:b].tolist()]
            p = 0
            fit = np.flatnonzero(free[:len(rows)] >= L)
            if len(fit):
                take = free[fit] // L
                before = np.cumsum(take) - take
                used = np.minimum(take, np.maximum(len(items) - before, 0))
                for j, k in zip(fit[used > 0].tolist(), used[used > 0].tolist()):
                    rows[j].extend(items[p:p + k])
                    free[j] -= k * L
                    p += k
            per_row = cap // L
            while p < len(items):
                k = min(per_row, len(items) - p)
                free[len(rows)] = cap - k * L
                rows.append(items[p:p + k])
                p += k
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
