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
