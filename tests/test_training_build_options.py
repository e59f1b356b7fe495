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
