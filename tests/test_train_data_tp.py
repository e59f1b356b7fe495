"""Data reading under tensor parallelism: only TP rank 0 of a (DP, PP) position builds and iterates a
loader; the other TP rank receives the same micro-batches over the TP group (bitwise), the loader state is
the same on both ranks and equals a plain loader's, and a loader restored from it continues exactly.

The test runs this file under torchrun (2 processes, gloo, TP=2)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from test_train_utils import demo_latents  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
N_FIRST, N_AFTER, N_VAL = 5, 3, 2


def _compose(latents, *overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from voxcpm_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("config", overrides=["experiment=demo", f"data.datasets.0.path={latents}", *overrides])
    return OmegaConf.to_object(cfg)


def _digest(batch: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        t = batch[k].cpu().contiguous()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _worker(latents: str, out_dir: str, *overrides: str) -> None:
    from voxcpm_train.platform import init_distributed, setup_platform

    platform = setup_platform("cpu")
    init_distributed(platform)
    import torch.distributed as dist

    from data_pipeline import loader as L
    from voxcpm_train.parallel.state import initialize_model_parallel
    from voxcpm_train.training.data import TrainData, validation_batches

    initialize_model_parallel(2, 1, seed=1234)
    counts = {"built": 0, "next": 0}
    init, nxt = L.VoxCPMDataLoader.__init__, L.VoxCPMDataLoader.__next__

    def counting_init(self, *a, **k):
        counts["built"] += 1
        init(self, *a, **k)

    def counting_next(self):
        counts["next"] += 1
        return nxt(self)

    L.VoxCPMDataLoader.__init__, L.VoxCPMDataLoader.__next__ = counting_init, counting_next
    job = _compose(latents, "parallel.tp=2", *overrides)
    data = TrainData(job, 0, 1)
    first = [_digest(next(data)) for _ in range(N_FIRST)]
    state = data.state_dict()
    resumed = TrainData(job, 0, 1)          # a fresh process's loader, restored from the checkpointed state
    resumed.load_state_dict(json.loads(json.dumps(state)))
    after = [_digest(next(resumed)) for _ in range(N_AFTER)]
    val = [_digest(b) for b in validation_batches(job, 0, 1, N_VAL)]
    rank = dist.get_rank()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({
        "counts": counts, "reader": data.is_reader, "reads": data.reads + resumed.reads, "first": first,
        "state": state, "after": after, "val": val, "positions": data.position_counter()}))
    dist.barrier()
    dist.destroy_process_group()


def _plain(latents, *overrides):
    """What one unsplit loader (DP=1, no TP) yields, in this process."""
    from data_pipeline.loader import VoxCPMDataLoader
    from voxcpm_train.training.data import blend_weights, data_config

    job = _compose(latents, *overrides)
    ld = VoxCPMDataLoader(data_config(job), 0, 1, weights=blend_weights(job))
    first = [_digest(next(ld)) for _ in range(N_FIRST + N_AFTER)]
    state = json.loads(json.dumps(ld.state_dict()))
    return first, state


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [(), ("data.packing=false",)], ids=["packed", "unpacked"])
def test_tp2_only_tp_rank0_reads(tmp_path, demo_latents, overrides):
    from conftest import run_torchrun

    run_torchrun(Path(__file__), demo_latents, tmp_path, *overrides, nproc=2, timeout=240,
                 env={"PYTHONPATH": str(REPO)})
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # TP rank 0 built the training, resumed and validation loaders and read every micro-batch; rank 1 none
    assert r0["reader"] and not r1["reader"]
    assert r0["counts"] == {"built": 3, "next": N_FIRST + N_AFTER + N_VAL} and r0["reads"] == N_FIRST + N_AFTER
    assert r1["counts"] == {"built": 0, "next": 0} and r1["reads"] == 0
    # both ranks got the same micro-batches (bitwise), the same as one plain loader's; same counters
    for key in ("first", "after", "val", "state", "positions"):
        assert r0[key] == r1[key], key
    plain, plain_state = _plain(demo_latents, *overrides)
    assert r0["first"] + r0["after"] == plain              # resumed from the state: exactly the same stream
    assert len(set(r0["first"] + r0["after"])) == N_FIRST + N_AFTER
    # the state a checkpoint stores is the reader's; after N_FIRST micro-batches it points at the next one
    assert r0["state"]["next_global_microbatch"] == N_FIRST and plain_state["next_global_microbatch"] == N_FIRST + N_AFTER


if __name__ == "__main__":
    _worker(*sys.argv[1:])
