"""`voxcpm-train` start-up checks and optimizer/curriculum wiring (in process, no training)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from test_train_utils import REPO, _env


def _compose(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from voxcpm_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("config", overrides=["experiment=demo", *overrides])
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("override,key", [
    ("parallel.tpp=2", "parallel.tpp"),
    ("parallel.tp=two", "parallel.tp"),
    ("stage.lr_wsd_decay_style=bogus", "stage.lr_wsd_decay_style"),
    ("optim.precision=fp8", "optim.precision"),
])
def test_bad_config_names_the_key(tmp_path, override, key):
    proc = subprocess.run([sys.executable, "-m", "voxcpm_train.train", "experiment=demo",
                           f"run.dir={tmp_path}", override], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert key in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]       # one message, no stack trace
    assert not (tmp_path / "checkpoints").exists()


def test_stage_schedule_checks():
    from voxcpm_train.config.model import ConfigError
    from voxcpm_train.training.curriculum import StageStart, scheduler_kwargs

    job = _compose("stage=anneal", "train.max_steps=20")
    kw = scheduler_kwargs(job, StageStart("anneal", 12, 48))
    assert kw["lr_decay_steps"] == 48 + 8 * 8 and kw["wsd_decay_steps"] == 8 * 8 and kw["lr_warmup_steps"] == 0
    assert kw["override_opt_param_scheduler"] and kw["min_lr"] == 1e-7
    with pytest.raises(ConfigError, match="train.max_steps"):
        scheduler_kwargs(job, StageStart("anneal", 20, 80))
    job = _compose("stage=joint", "train.max_steps=20", "stage.lr_warmup_steps=15")
    with pytest.raises(ConfigError, match="stage.lr_warmup_steps"):
        scheduler_kwargs(job, StageStart("joint", 10, 40))


def test_lr_mult_param_groups(megatron_single):
    """optim.lr_mult={feat_decoder: 2.0}: megatron param-group override; the scheduler keeps the ratio."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    from voxcpm_train.platform import current_platform
    from voxcpm_train.training.build import build_model_and_optimizer
    from voxcpm_train.training.curriculum import StageStart, build_scheduler

    job = _compose("+optim.lr_mult={feat_decoder: 2.0}", "train.max_steps=20", "stage.lr_warmup_steps=4")
    start = StageStart("pretrain", 0, 0)
    chunks, opt = build_model_and_optimizer(job, current_platform())
    sched = build_scheduler(opt, job, start)
    sched.step(increment=2 * job.parallel.global_batch_size)       # half way through the warmup
    from voxcpm_train.parallel.optim import inner_optimizers

    (inner,) = inner_optimizers(opt)                 # megatron DistributedOptimizer
    groups = inner.optimizer.param_groups
    by_param = {id(p): groups[gi]["lr"] for p, (gi, _) in inner.model_param_group_index_map.items()}
    base = get_canonical_lr_for_logging(opt.param_groups)
    assert base == pytest.approx(job.optim.lr / 2)
    n_dec = 0
    for name, p in chunks[0].named_parameters():
        lr = by_param[id(p)]
        if ".feat_decoder." in f".{name}":
            n_dec += 1
            assert lr == pytest.approx(2 * base), name
        else:
            assert lr == pytest.approx(base), name
    assert n_dec > 0
