"""The checkpoint directory protocol (no training): what counts as a checkpoint, `latest`, pruning."""
from __future__ import annotations

from voxcpm_train.training.checkpoint import CheckpointManager, find_latest, list_checkpoints


def _write(tmp):
    (tmp / "model").mkdir()
    (tmp / "extra_state.json").write_text("{}")


def test_commit_latest_and_prune(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (3, 6, 9):
        final = mgr.save(step, _write)
        assert final.name == f"step_{step:07d}" and (final / "COMPLETE").is_file()
        assert (tmp_path / "latest").read_text().strip() == final.name
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000006", "step_0000009"]
    assert find_latest(tmp_path).name == "step_0000009"


def test_interrupted_writes_are_ignored_and_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(4, _write)
    # a write killed before the rename, one killed after the rename but before the marker (cannot
    # happen with this manager, but a copied/partial directory must not count), and a stale pointer
    tmp = mgr.begin(8)
    _write(tmp)
    (tmp_path / "step_0000012").mkdir()
    (tmp_path / "step_0000012" / "extra_state.json").write_text("{}")
    (tmp_path / "latest").write_text("step_0000012\n")
    assert find_latest(tmp_path).name == "step_0000004"
    removed = {p.name for p in mgr.clean_interrupted()}
    assert removed == {"step_0000008.tmp", "step_0000012"}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004"]


def test_pointer_one_behind_after_crash(tmp_path):
    """A crash between the rename and the pointer update leaves `latest` one behind: the newer wins."""
    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(2, _write)
    mgr.save(5, _write)
    (tmp_path / "latest").write_text("step_0000002\n")
    assert find_latest(tmp_path).name == "step_0000005"
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path).name == "step_0000005"
    assert find_latest(tmp_path / "nothing") is None


# --------------------------------------------------------------------------------------------- async
# CheckpointManager.save_async with megatron's AsyncRequest / AsyncCallsQueue (a forked writer), in a
# world of one process: the COMPLETE marker and `latest` come only after the write is finalized, and a
# writer that dies is never taken as a checkpoint.

def _async_write(body):
    """A `write(tmp)` for save_async: writes model/ in a forked process running `body(tmp)`."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    def write(tmp):
        (tmp / "model").mkdir()

        def async_fn():
            body(tmp)
            (tmp / "extra_state.json").write_text("{}")
        return AsyncRequest(async_fn, (), [])
    return write


def test_async_commit_only_after_finalize(tmp_path, megatron_single):
    import time

    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(2, _write)
    t0 = time.time()
    tmp = mgr.save_async(5, _async_write(lambda tmp: time.sleep(1.5)))
    assert time.time() - t0 < 1.0                        # the caller did not wait for the writer
    assert mgr.pending == [5] and tmp.name == "step_0000005.tmp"
    assert not (tmp / "COMPLETE").exists() and find_latest(tmp_path).name == "step_0000002"
    assert mgr.finalize_pending(blocking=False) == []    # writer still running: nothing committed
    assert find_latest(tmp_path).name == "step_0000002"
    assert mgr.finalize_pending(blocking=True) == [5]
    final = tmp_path / "step_0000005"
    assert (final / "COMPLETE").is_file() and (final / "extra_state.json").is_file() and not tmp.exists()
    assert not (final / ".async_ok").exists()
    assert (tmp_path / "latest").read_text().strip() == "step_0000005" and mgr.pending == []
    # the next save finalizes a pending one first
    mgr.save_async(7, _async_write(lambda tmp: time.sleep(0.3)))
    mgr.save(8, _write)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000005", "step_0000007",
                                                            "step_0000008"]


def test_async_writer_killed_is_not_a_checkpoint(tmp_path, megatron_single):
    import os
    import signal

    import pytest

    def die(tmp):
        (tmp / "model" / "part").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)             # the writer dies mid-write

    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(3, _write)
    mgr.save_async(6, _async_write(die))
    with pytest.raises(RuntimeError, match="did not finish"):
        mgr.finalize_pending(blocking=True)
    assert mgr.pending == []
    assert not (tmp_path / "step_0000006").exists() and not (tmp_path / "step_0000006.tmp" / "COMPLETE").exists()
    assert find_latest(tmp_path).name == "step_0000003"
    assert {p.name for p in mgr.clean_interrupted()} == {"step_0000006.tmp"}
    # abort (error path): the writer is killed, nothing is committed
    mgr.save_async(9, _async_write(lambda tmp: __import__("time").sleep(30)))
    mgr.abort_pending()
    assert mgr.pending == [] and find_latest(tmp_path).name == "step_0000003"
