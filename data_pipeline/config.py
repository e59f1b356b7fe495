"""Structured config of the `data` group (configs/data/*.yaml). Plain dataclasses: Hydra/OmegaConf
structured configs; `voxcpm_train.config` may register them in its ConfigStore."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class LayoutProbs:
    """Mixture of sequence layouts for one dataset (normalised; unavailable layouts fall back to tts)."""

    tts: float = 0.5
    clone: float = 0.3
    continuation: float = 0.1
    clone_continuation: float = 0.1


@dataclass
class SampleFilter:
    """Which samples of the latent folder a dataset holds: every set condition must hold (null / false =
    no condition). Applied when the dataset's index is built; recorded in the loader state."""

    min_dnsmos: Optional[float] = None          # dnsmos >= this (samples without a dnsmos value are dropped)
    require_description: bool = False           # only voice-design samples (a non-empty description)
    languages: Optional[List[str]] = None       # language tags to keep (case-insensitive), e.g. [en, zh]
    min_duration: Optional[float] = None        # seconds, inclusive
    max_duration: Optional[float] = None        # seconds, inclusive


@dataclass
class DatasetConfig:
    name: str = "demo"
    path: str = "demo_data/latents"      # folder written by `voxcpm-data encode`
    weight: float = 1.0                  # blend weight (stages may override)
    layouts: LayoutProbs = field(default_factory=LayoutProbs)
    filter: SampleFilter = field(default_factory=SampleFilter)   # sample subset of `path` (default: all)


@dataclass
class EncodeConfig:
    """The AudioVAE the latents were encoded with (training decodes its audio samples with it). The
    encoding itself is set by the flags of `voxcpm-data encode`."""

    vae_config: str = "small"            # small | full
    vae_path: Optional[str] = None       # audiovae.safetensors; None -> seeded random init (recorded)
    # latents from a random-init AudioVAE are expected (demo, tests): no start-up warning about them
    allow_random_init: bool = False


@dataclass
class DataConfig:
    datasets: list = field(default_factory=lambda: [DatasetConfig()])
    tokenizer_path: str = "demo_data/tokenizer"
    patch_size: int = 4
    latent_dim: int = 64
    packing: bool = True                 # pack several samples per row (else length-bucketed padding)
    row_tokens: int = 1024               # positions per row (packing) / max positions per sample
    rows_per_microbatch: int = 2         # packing: micro-batch = rows_per_microbatch x row_tokens
    token_budget: int = 4096             # no packing: rows x padded length <= token_budget
    pad_to_multiple: int = 8             # no packing: padded length multiple
    window_samples: int = 2048           # samples planned (drawn, packed, shuffled) together
    max_ref_patches: int = 75            # reference / prompt clips longer than this (12 s) are not used
    seed: int = 1234
    num_workers: int = 2
    prefetch_factor: int = 4
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    # latent folder of a held-out validation set (`voxcpm-data encode` of a separate manifest), with the
    # layouts of datasets[0]; None = validation micro-batches drawn from the training datasets (data.seed + 1)
    validation_path: Optional[str] = None


def to_dict(x) -> dict:
    """A dict / OmegaConf node / dataclass instance as a plain dict (nested nodes resolved)."""
    if isinstance(x, dict):
        return dict(x)
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(x):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:
        pass
    import dataclasses
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else vars(x)
