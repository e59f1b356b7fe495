"""Checkpoint directory protocol: temp dir -> COMPLETE marker -> atomic rename -> `latest` pointer.

    run.dir/checkpoints/
        step_0000040/            a complete checkpoint (never modified after the rename)
            model/               torch_dist: model + optimizer tensors (voxcpm_train.parallel.save_checkpoint)
            rank_state/          per-rank RNG states (loaded with weights_only=True)
            extra_state.json     scheduler, Adam step, layout, and our trainer state under "extra": step,
                                 consumed samples, stage + stage start, data-loader state of every DP rank
            config.yaml          the resolved config of the run that wrote it
            COMPLETE             written last, before the rename
        step_0000060.tmp/        an interrupted write: ignored and deleted on the next start
        latest                   text file "step_0000060", replaced atomically

A directory counts as a checkpoint only when it is named `step_<n>` and holds `COMPLETE`; `latest` is a
hint (the newest complete directory wins if `latest` is stale or missing).

Async saves (`checkpoint.async_save`): `save_async` creates the temp dir, lets `write` capture the state and
return megatron's `AsyncRequest`, and schedules it on megatron's `AsyncCallsQueue` (a forked writer per
rank); training goes on. The request's finalize functions run on every rank once every rank's writer has
exited (`finalize_pending`, polled each step, blocking before the next save, on a signal and at the end):
megatron's (`.metadata`, failure check), the caller's (extra_state.json), then ours: each rank checks
that its writer reached its end (a per-rank `.async_ok` file written by the writer as its last act), all
ranks agree, and only then `commit` writes `COMPLETE`, renames and moves `latest`. A writer that died,
failed or was never finalized leaves `step_<n>.tmp/` without the marker: never a checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch.distributed as dist

from voxcpm_train.parallel.state import all_ranks

MARKER = "COMPLETE"
LATEST = "latest"
ASYNC_OK = ".async_ok"          # temp-dir folder: one file per rank whose async writer finished
_NAME = re.compile(r"^step_(\d{7,})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and _NAME.match(path.name) is not None and (path / MARKER).is_file()


def list_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint to resume from: `latest` if it names a complete one, else the newest complete."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if is_complete(cand):
            newest = list_checkpoints(root)[-1]
            # `latest` is replaced after the rename; a crash in between leaves it one behind
            return newest if int(_NAME.match(newest.name).group(1)) > int(_NAME.match(cand.name).group(1)) else cand
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _writer_then_mark(async_fn, ok_file: Path):
    """The async writer, then (only if it returned) this rank's `.async_ok` file: runs in the forked writer."""
    def run(*args, **kwargs):
        async_fn(*args, **kwargs)
        ok_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(ok_file, "ok\n")
    return run


class CheckpointManager:
    """Writes checkpoints through the directory protocol and prunes old ones (rank 0 does the renames)."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = int(keep_last)
        self._queue = None          # megatron AsyncCallsQueue, made on the first async save
        self._pending: List[tuple] = []    # (step, time scheduled) of scheduled, unfinalized saves
        self.committed: List[tuple] = []   # (step, final dir, seconds from schedule to commit) of async saves

    def clean_interrupted(self) -> List[Path]:
        """Delete leftovers of interrupted writes (rank 0); returns what was removed."""
        removed = []
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and (p.name.endswith(".tmp") or (p.name.startswith("step_") and not is_complete(p))):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        _barrier()
        return removed

    def tmp_dir(self, step: int) -> Path:
        return self.root / (step_dir_name(step) + ".tmp")

    def begin(self, step: int) -> Path:
        """Create (fresh) the temp dir of `step` on every rank's view; returns it."""
        tmp = self.tmp_dir(step)
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        return tmp

    def commit(self, step: int) -> Path:
        """All ranks finished writing into the temp dir: mark, rename, point `latest`, prune."""
        _barrier()
        tmp, final = self.tmp_dir(step), self.root / step_dir_name(step)
        if _rank() == 0:
            _fsync_dir(tmp)
            _atomic_write_text(tmp / MARKER, f"{step}\n")
            if final.exists():  # same step written again (e.g. a rerun): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _atomic_write_text(self.root / LATEST, final.name + "\n")
            self.prune()
        _barrier()
        return final

    def prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.root)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Synchronous save: `write(tmp_dir)` runs on every rank, then `commit`."""
        self.finalize_pending(blocking=True)
        tmp = self.begin(step)
        write(tmp)
        return self.commit(step)

    # -- async --------------------------------------------------------------------------------------
    @property
    def pending(self) -> List[int]:
        """Steps of scheduled async saves not finalized yet (the same on every rank)."""
        return [s for s, _ in self._pending]

    def save_async(self, step: int, write: Callable[[Path], object]) -> Path:
        """Async save (collective): finalize what is pending, then `write(tmp_dir)` returns megatron's
        `AsyncRequest` (or None: written synchronously); it is scheduled and committed by a later
        `finalize_pending`. Returns the temp dir."""
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.finalize_pending(blocking=True)     # one save in flight at a time (megatron's results queue)
        tmp = self.begin(step)
        request = write(tmp)
        if request is None:
            self.commit(step)
            return tmp
        ok = tmp / ASYNC_OK / f"rank_{_rank():05d}"
        expect_ok = request.async_fn is not None     # None: nothing to write on this rank
        if expect_ok:
            request = request._replace(async_fn=_writer_then_mark(request.async_fn, ok))
        scheduled = time.time()

        def check_and_commit():
            if not all_ranks(ok.is_file() or not expect_ok):
                raise RuntimeError(f"async checkpoint of step {step}: a rank's writer did not finish; "
                                   f"{tmp} stays incomplete (never loaded, deleted on the next start)")
            _barrier()
            if _rank() == 0:
                shutil.rmtree(tmp / ASYNC_OK, ignore_errors=True)
            final = self.commit(step)
            self.committed.append((step, final, time.time() - scheduled))

        request.add_finalize_fn(check_and_commit)
        if self._queue is None:
            # not persistent: a fork per save, whose copy-on-write snapshot keeps CPU tensors (which
            # megatron's preload does not copy) as they were when the save was scheduled
            self._queue = AsyncCallsQueue(persistent=False)
        self._queue.schedule_async_request(request)
        self._pending.append((step, scheduled))
        return tmp

    def finalize_pending(self, blocking: bool = False) -> List[int]:
        """Finalize (commit) the async saves whose writers finished on every rank; with `blocking`, wait
        for all. Collective when something is pending. Returns the committed steps."""
        if self._queue is None or not self._pending:
            return []
        n = len(self._pending)
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        finally:   # a failed finalize (raised on every rank) also leaves the queue
            left = self._queue.get_num_unfinalized_calls()
            steps = [s for s, _ in self._pending[:n - left]]
            del self._pending[:n - left]
        return steps

    def abort_pending(self) -> None:
        """Kill this rank's writers without finalizing (error path): their temp dirs stay incomplete."""
        if self._queue is not None:
            for call in list(self._queue.async_calls):
                try:
                    call.async_caller.close(abort=True)
                except Exception:
                    pass
            self._queue.async_calls.clear()
        self._pending.clear()


def read_trainer_state(ckpt_dir: Path) -> dict:
    """The trainer state (step, samples, stage, loader states) of a complete checkpoint, from the
    `extra` entry of voxcpm_train.parallel's extra_state.json."""
    meta = json.loads((Path(ckpt_dir) / "extra_state.json").read_text())
    return meta["extra"]
