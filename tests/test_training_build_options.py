"""Start-up checks of the DDP overlap options (`training/build.py`): errors name the key, before any
model is built."""

from types import SimpleNamespace

import pytest

from voxcpm_train.config.checkpoint import CheckpointConfig
from voxcpm_train.config.model import ConfigError
from voxcpm_train.config.parallel import ParallelConfig


def _job(checkpoint=None, **parallel):
    return SimpleNamespace(parallel=ParallelConfig(**parallel), checkpoint=checkpoint or CheckpointConfig())


def test_overlap_options_checked_at_start_up():
    from voxcpm_train.training.build import _check_overlap

    _check_overlap(_job())
    _check_overlap(_job(overlap_param_gather=True))  # one bucket: checkpoints stay correct
    _check_overlap(_job(overlap_grad_reduce=True, use_distributed_optimizer=False))
    no_saves = CheckpointConfig(every=0, save_at_end=False, exit_on_signal=False)
    _check_overlap(_job(no_saves, overlap_grad_reduce=True, overlap_param_gather=True))  # benchmarks
    with pytest.raises(ConfigError, match="parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer"):
        _check_overlap(_job(overlap_param_gather=True, use_distributed_optimizer=False))
    with pytest.raises(ConfigError, match="parallel.overlap_grad_reduce=true splits the gradients"):
        _check_overlap(_job(overlap_grad_reduce=True))


def test_recompute_keys_reach_the_model_config():
    """parallel.recompute / parallel.recompute_local set the model's TSLM/RALM and LocEnc/LocDiT recompute;
    a wrong parallel.recompute_local (or model.recompute_local_granularity) is one ConfigError naming it."""
    from voxcpm_train.config.job import validate_job_config
    from voxcpm_train.config.model import validate_model_config
    from voxcpm_train.training.build import run_model_config

    from test_train_config import _compose

    job = _compose("parallel.recompute=selective", "parallel.recompute_local=full")
    validate_job_config(job, check_model=False)
    cfg = run_model_config(job, "bf16")
    assert (cfg.recompute_granularity, cfg.recompute_local_granularity, cfg.params_dtype) == ("selective", "full", "bfloat16")
    default = run_model_config(_compose(), "fp32")
    assert default.recompute_local_granularity is None and default.recompute_granularity is None
    with pytest.raises(ConfigError, match=r"^parallel.recompute_local='selective' must be one of \('none', 'full'\)$"):
        validate_job_config(_compose("parallel.recompute_local=selective"), check_model=False)
    with pytest.raises(ConfigError, match=r"^model.recompute_local_granularity='selective' is not one of null, full$"):
        validate_model_config(_compose("model.recompute_local_granularity=selective").model)


def test_local_recompute_is_a_run_key(tmp_path):
    """A run starting from (or resuming) a checkpoint takes model.recompute_local_granularity from its own
    config, also from a checkpoint written before the key existed: recompute does not shape the weights."""
    from omegaconf import OmegaConf

    from voxcpm_train.config.job import model_from_checkpoint
    from voxcpm_train.convert.checkpoint import CONFIG_YAML

    from test_train_config import _compose

    job = _compose("model.recompute_local_granularity=full")
    saved = OmegaConf.to_container(OmegaConf.structured(job.model))
    del saved["recompute_local_granularity"]                     # a checkpoint from before the key
    (tmp_path / CONFIG_YAML).write_text(OmegaConf.to_yaml({"model": saved}))
    got = model_from_checkpoint(job, tmp_path, "checkpoint.load=ckpt", ["model.recompute_local_granularity=full"])
    assert got.recompute_local_granularity == "full" and got.lm == job.model.lm
