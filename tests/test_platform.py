"""Platform layer: detection, distributed env parsing, and the CPU redirection of megatron-core's
CUDA calls (applied only on the cpu platform, idempotent, narrow)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from voxcpm_train.platform import core, detect_platform, dist_env

ROOT = Path(__file__).resolve().parents[1]


def test_detect_platform(monkeypatch):
    monkeypatch.setattr(core, "_npu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_platform("auto") == "cpu"
    assert detect_platform(None) == "cpu"
    assert detect_platform("CPU") == "cpu"
    with pytest.raises(RuntimeError, match="platform.device=cuda"):
        detect_platform("cuda")
    with pytest.raises(RuntimeError, match="platform.device=npu"):
        detect_platform("npu")
    with pytest.raises(ValueError, match="must be one of"):
        detect_platform("tpu")
    monkeypatch.setattr(core, "_npu_available", lambda: True)
    assert detect_platform("auto") == "npu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detect_platform("auto") == "cuda"  # cuda wins when both are present


def test_platform_fields():
    cpu = core.Platform("cpu", "gloo")
    assert cpu.device == torch.device("cpu") and cpu.is_cpu and cpu.param_dtype == torch.float32
    gpu = core.Platform("cuda", "nccl", local_rank=3)
    assert gpu.device == torch.device("cuda", 3) and gpu.param_dtype == torch.bfloat16


def test_dist_env():
    e = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
                  "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (3, 4, 1, "h0", 1234)
    s = dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                  "SLURM_JOB_NODELIST": "gpu[012-015,020],cpu1"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr) == (5, 8, 1, "gpu012")
    assert dist_env({}).world_size == 1
    with pytest.raises(ValueError, match="outside world size"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2"})


_REDIRECT_SCRIPT = textwrap.dedent(r"""
    import json, sys, warnings
    import torch
    from voxcpm_train.platform import core, cpu_redirect, setup_platform
    out = {}

    # 1. a non-cpu platform installs nothing (cuda faked: no GPU here)
    core.detect_platform = lambda kind: "cuda"
    torch.cuda.set_device = lambda i: None
    p = setup_platform("cuda")
    import megatron.core.parallel_state as ps          # imported before the cpu setup
    out["cuda_kind"] = p.kind
    out["cuda_not_applied"] = (not cpu_redirect.is_applied()) and ps.torch is torch
    core._CURRENT = None

    # 2. cpu: patched in place (with a warning) and for modules imported later
    core.detect_platform = lambda kind: kind
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p1 = setup_platform("cpu")
    out["late_warning"] = any("after megatron was imported" in str(x.message) for x in w)
    out["same_object"] = setup_platform("cpu") is p1
    try:
        setup_platform("npu"); out["kind_switch_refused"] = False
    except RuntimeError:
        out["kind_switch_refused"] = True
    cpu_redirect.apply()                                # idempotent
    n_hooks = sum(type(f).__name__ == "_MegatronImportHook" for f in sys.meta_path)
    out["one_hook"] = n_hooks == 1
    out["tensor_cuda_wrapped_once"] = not hasattr(torch.Tensor.cuda.__wrapped__, "__wrapped__")
    from megatron.core.pipeline_parallel import schedules, p2p_communication
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.optimizer import clip_grads
    out["loaded_patched"] = ps.torch is cpu_redirect.CPU_TORCH
    out["later_patched"] = all(m.torch is cpu_redirect.CPU_TORCH
                               for m in (schedules, p2p_communication, mrandom, clip_grads))
    out["torch_itself_untouched"] = torch.zeros is not cpu_redirect.CPU_TORCH.zeros and \
        torch.cuda.current_device is not cpu_redirect.CPU_CUDA.current_device
    t = cpu_redirect.CPU_TORCH.zeros(2, device="cuda", pin_memory=True)
    out["factory_to_cpu"] = t.device.type == "cpu"
    out["current_device"] = str(cpu_redirect.CPU_CUDA.current_device())
    try:
        torch.zeros(1, device="cuda"); out["real_torch_still_cuda"] = False
    except (RuntimeError, AssertionError):
        out["real_torch_still_cuda"] = True
    x = torch.ones(2)
    g = {"__name__": "megatron.core.fake"}
    exec("r = (x.type(), x.cuda() is x)", g | {"x": x}, loc := {})
    out["megatron_view"] = list(loc["r"])
    out["other_view_type"] = x.type()
    try:
        x.cuda(); out["other_cuda_raises"] = False
    except (RuntimeError, AssertionError):
        out["other_cuda_raises"] = True
    out["rng_fns_replaced"] = mrandom._set_cuda_rng_state is cpu_redirect._cpu_set_rng_state

    # 3. megatron's model-parallel RNG tracker works on the CPU generator
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % int(sys.argv[1]),
                            rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    mrandom.model_parallel_cuda_manual_seed(7)
    a = torch.rand(3)
    with mrandom.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    c = torch.rand(3)
    torch.manual_seed(7); a2, c2 = torch.rand(3), torch.rand(3)
    torch.manual_seed(7 + 2718); b2 = torch.rand(3)
    out["tracker_fork"] = bool(torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(c, c2))
    print("RESULT" + json.dumps(out))
""")


def test_cpu_redirection_subprocess():
    from conftest import free_port

    proc = subprocess.run([sys.executable, "-c", _REDIRECT_SCRIPT, str(free_port())], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(line[0][len("RESULT"):])
    assert r.pop("cuda_kind") == "cuda"
    assert r.pop("current_device") == "cpu"
    assert r.pop("megatron_view") == ["torch.cuda.FloatTensor", True]
    assert r.pop("other_view_type") == "torch.FloatTensor"
    failed = [k for k, v in r.items() if v is not True]
    assert not failed, r
