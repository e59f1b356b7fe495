"""voxcpm_train.parallel in one process (world of 1, gloo): the errors it promises, and a
save/load round trip compared against the live model and optimizer state."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))


@pytest.fixture()
def parts(megatron_single):
    import common as C  # tests/dist/common.py: the GPT stand-in

    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.parallel import build_model_chunks, build_optimizer, build_scheduler

    def make(dist_opt=False, **ddp_kw):
        chunks = build_model_chunks(C.gpt_provider,
                                    DistributedDataParallelConfig(use_distributed_optimizer=dist_opt, **ddp_kw))
        opt = build_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4,
                                              use_distributed_optimizer=dist_opt), chunks)
        sched = build_scheduler(opt, max_lr=1e-3, min_lr=1e-4, warmup=1, decay=5,
                                decay_style="linear")
        return chunks, opt, sched

    C.MODEL = "gpt"
    return C, make


def test_build_errors(parts):
    C, make = parts
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.parallel import build_model_chunks, build_optimizer

    chunks, _, _ = make()
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        build_optimizer(OptimizerConfig(use_distributed_optimizer=True), chunks)
    with pytest.raises(ValueError, match="grad_reduce_in_fp32"):
        build_model_chunks(C.gpt_provider, DistributedDataParallelConfig(),
                           param_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="without a .config"):
        build_model_chunks(lambda pre_process, post_process: torch.nn.Linear(2, 2),
                           DistributedDataParallelConfig())
    assert chunks[0].module.config.calculate_per_token_loss is True


def test_roundtrip_and_errors(parts, tmp_path):
    C, make = parts
    from voxcpm_train.parallel import load_checkpoint, save_checkpoint

    chunks, opt, sched = make()
    C.run_steps(chunks, opt, sched, [1, 2])
    params = [p.detach().clone() for p in chunks[0].parameters()]
    state = C.adam_state(chunks, opt)
    save_checkpoint(tmp_path / "a", chunks, opt, sched, extra_state={"k": [1, 2]},
                    rank_state={"pos": torch.arange(3)})
    meta = json.loads((tmp_path / "a" / "extra_state.json").read_text())
    assert meta["optimizer"]["step"] == 2 and meta["scheduler"]["num_steps"] == 2
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path / "a", chunks, opt, sched)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "c", chunks, opt, sched, extra_state={"t": torch.ones(1)})

    # a differently initialised model/optimizer gets exactly the saved state back
    torch.manual_seed(99)
    chunks2, opt2, sched2 = make()
    assert not torch.equal(params[0], next(chunks2[0].parameters()))
    info = load_checkpoint(tmp_path / "a", chunks2, opt2, sched2)
    assert info.extra_state == {"k": [1, 2]} and info.rng_restored
    assert torch.equal(info.rank_state["pos"], torch.arange(3))
    assert all(torch.equal(a, b) for a, b in zip(params, chunks2[0].parameters()))
    assert C.max_state_diff(C.adam_state(chunks2, opt2), state) == 0.0
    assert sched2.num_steps == 2
    steps = [st["step"] for st in opt2.chained_optimizers[0].optimizer.state.values()]
    assert len({id(s) for s in steps}) == len(steps)  # one step tensor per parameter

    save_checkpoint(tmp_path / "w", chunks)  # weights only
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "w", chunks2, opt2)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "missing", chunks2)
    meta["format_version"] = 0
    (tmp_path / "a" / "extra_state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="checkpoint format"):
        load_checkpoint(tmp_path / "a", chunks2)


def test_several_buckets_refused(parts, tmp_path):
    """fully_reshardable + several DDP buckets would scramble the state on megatron-core 0.16."""
    C, make = parts
    from voxcpm_train.parallel import save_checkpoint

    chunks, opt, sched = make(dist_opt=True, overlap_grad_reduce=True, bucket_size=2000)
    assert len(opt.chained_optimizers[0].buffers[0].buckets) > 1
    with pytest.raises(RuntimeError, match="one DDP bucket"):
        save_checkpoint(tmp_path / "b", chunks, opt, sched)


def test_loading_refuses_pickled_code(parts, tmp_path):
    """A torch_dist checkpoint whose .metadata pickle calls a function is refused before
    anything runs; non-tensor items are read with weights_only=True."""
    import io
    import pickle

    C, make = parts
    from voxcpm_train.parallel import load_checkpoint, save_checkpoint
    from voxcpm_train.parallel.safe_load import safe_dcp_reading

    chunks, opt, sched = make()
    save_checkpoint(tmp_path / "a", chunks, opt, sched)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "a" / "model" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="builtins|io"):
        load_checkpoint(tmp_path / "a", chunks, opt, sched)
    assert not marker.exists()

    from torch.distributed.checkpoint import default_planner

    buf = io.BytesIO()
    torch.save(Evil(), buf)
    with safe_dcp_reading():
        buf.seek(0)
        with pytest.raises(pickle.UnpicklingError):
            default_planner.torch.load(buf, weights_only=False)
    assert default_planner.torch is torch and not marker.exists()
