"""Validation loss (forward only, fixed micro-batches) and audio samples for fixed texts during training."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("voxcpm_train")


@torch.no_grad()
def validation_loss(trainer) -> dict | None:
    """Loss of the fixed validation micro-batches (all ranks take part; returns the same dict on every rank)."""
    from voxcpm_train.parallel.step import eval_step
    from voxcpm_train.training.data import validation_batches
    from voxcpm_train.training.forward import make_forward_step

    job = trainer.job
    if getattr(trainer, "_val_batches", None) is None:
        trainer._val_batches = validation_batches(job, trainer.dp_rank, trainer.dp, job.logging.val_batches)
    batches = trainer._val_batches
    for chunk in trainer.model_chunks:
        chunk.eval()
    try:
        loss, n, logs = eval_step(
            make_forward_step(job.model, trainer.platform.device), iter(batches), trainer.model_chunks,
            num_microbatches=len(batches), seq_length=2 * trainer.data.seq_length,
            micro_batch_size=job.parallel.micro_batch_size)
    finally:
        for chunk in trainer.model_chunks:
            chunk.train()
    n = max(n, 1.0)
    return {"loss": loss, "loss_diff": logs["diff_sum"] / n, "loss_stop": logs["stop_sum"] / n}


def vae_seed(job) -> int:
    """Seed of the random-init AudioVAE the first dataset was encoded with (recorded in its meta.json)."""
    first = job.data.datasets[0]
    meta = Path(first["path"] if isinstance(first, dict) else first.path) / "meta.json"
    if meta.is_file():
        vae = json.loads(meta.read_text()).get("vae", {})
        if vae.get("weights") == "random_init":
            return int(vae.get("seed", 0))
    return 0


def load_vae_decoder(job):
    """AudioVAE V2 (with decoder) as the data was encoded: data.encode.vae_path, or the seeded random
    init recorded next to the latents (demo)."""
    from data_pipeline.audio_vae import AudioVAEConfig, load_audio_vae

    enc = job.data.encode
    vae, _ = load_audio_vae(enc.vae_path, AudioVAEConfig.preset(enc.vae_config), with_decoder=True,
                            seed=vae_seed(job))
    return vae


def mel_png(wav: torch.Tensor, sr: int, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sr, n_fft=2048, hop_length=480, n_mels=80)(wav.float())
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.imshow((mel + 1e-5).log().numpy(), origin="lower", aspect="auto")
    ax.set_title(title)
    ax.set_xlabel("frame (10 ms)")
    ax.set_ylabel("mel bin")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def generate_samples(trainer) -> list:
    """Generate `logging.sample_texts` into run.dir/samples/step_<n>_<i>.wav (+ mel PNG, wandb).

    The ranks of data-parallel group 0 run the sampler in lockstep (their TP collectives need every TP
    rank; all draw the same noise), TP rank 0 decodes and writes. Needs pp = 1 (the sampler runs the
    whole model in one process per TP rank)."""
    from megatron.core import parallel_state

    job = trainer.job
    if job.parallel.pp > 1:
        if not getattr(trainer, "_warned_samples", False):
            log.warning("audio samples need pp = 1 (the whole model in each process): skipped; export the "
                        "checkpoint (voxcpm-export) and generate with voxcpm instead")
            trainer._warned_samples = True
        return []
    written = []
    if parallel_state.get_data_parallel_rank() == 0:
        write = parallel_state.get_tensor_model_parallel_rank() == 0
        written = write_samples(job, trainer.model_chunks[0], trainer.run_dir / "samples", trainer.step,
                                trainer.metrics if write else None, write=write)
    dist.barrier()
    return written


@torch.no_grad()
def write_samples(job, model_chunk, out_dir: Path, step: int, metrics=None, write: bool = True) -> list:
    """Sample every text; with `write=False` only take part in the generation (a TP peer)."""
    import soundfile as sf

    from data_pipeline.tokenizer import TextTokenizer
    from voxcpm_train.generation.sampler import GenerationConfig, generate_latents
    from voxcpm_train.parallel.model import unwrap_model

    model = unwrap_model(model_chunk)
    was_training = model.training
    model.eval()
    tok = TextTokenizer(job.data.tokenizer_path)
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        vae = load_vae_decoder(job)
        sr = vae.config.out_sample_rate
    gen = GenerationConfig(max_patches=job.logging.sample_max_patches, timesteps=job.logging.sample_timesteps,
                           cfg_value=job.logging.sample_cfg, seed=job.train.seed)
    written = []
    try:
        for i, text in enumerate(job.logging.sample_texts):
            ids = tok(text)
            latents = generate_latents(model, ids, gen)                         # [frames, 64]
            if latents.shape[0] == 0 or not write:
                continue
            wav = vae.decode(latents.t().unsqueeze(0).float(), sr)[0, 0].clamp(-1, 1)
            if not torch.isfinite(wav).all():
                log.warning(f"sample {i}: non-finite audio, not written")
                continue
            wav_path = out_dir / f"step_{step:07d}_{i}.wav"
            sf.write(wav_path, wav.numpy(), sr)
            png = mel_png(wav, sr, out_dir / f"step_{step:07d}_{i}.png", f"step {step}: {text[:60]}")
            written.append(wav_path)
            log.info(f"sample {i} ({latents.shape[0] / 25:.2f} s, {sr} Hz) -> {wav_path}")
            if metrics is not None:
                metrics.log_audio(step, f"text{i}", wav_path, png, sr)
    finally:
        model.train(was_training)
    return written
