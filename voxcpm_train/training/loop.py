"""The training loop (nanoGPT-readable): set up, resume, then step / log / validate / sample / save."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from voxcpm_train.config.model import ConfigError
from voxcpm_train.training import checkpoint as ckio
from voxcpm_train.training.assets import link_assets, write_run_assets
from voxcpm_train.parallel.state import any_rank, comm_device
from voxcpm_train.training.curriculum import StageStart, build_scheduler, stage_global_batch
from voxcpm_train.training.metrics import MetricsLogger, plot_loss_curve
from voxcpm_train.training.signals import StopSignal

log = logging.getLogger("voxcpm_train")


def _setup_logging(rank: int) -> None:
    """Rank 0 logs INFO, the others WARNING (Hydra's job_logging set up the handlers)."""
    root = logging.getLogger()
    if not root.handlers:   # used outside the Hydra app
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Trainer:
    """Holds everything of one training process; `run()` is the loop."""

    def __init__(self, job):
        from voxcpm_train.platform import init_distributed, setup_platform

        self.job = job
        self.platform = setup_platform(job.platform.device)          # before megatron is imported
        if job.platform.threads:
            torch.set_num_threads(int(job.platform.threads))
        if job.platform.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.env = init_distributed(self.platform)
        _setup_logging(self.env.rank)

        from voxcpm_train.parallel.state import initialize_model_parallel
        from megatron.core import parallel_state as ps

        p = job.parallel
        world = self.env.world_size
        if world % (p.tp * p.pp) != 0:
            raise ConfigError(f"parallel.tp={p.tp} x parallel.pp={p.pp} does not divide the world size {world}")
        self.dp = world // (p.tp * p.pp)
        if p.dp is not None and p.dp != self.dp:
            raise ConfigError(f"parallel.dp={p.dp} but world size {world} / (tp*pp) = {self.dp}")
        initialize_model_parallel(p.tp, p.pp, seed=job.train.seed)
        self.ps = ps
        self.dp_rank = ps.get_data_parallel_rank()

        self.run_dir = Path(job.run.dir)
        self.ckpt = ckio.CheckpointManager(self.run_dir / "checkpoints", job.checkpoint.keep_last)
        if self.env.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.ckpt.clean_interrupted()

    # ------------------------------------------------------------------------------------------ #
    # set-up
    # ------------------------------------------------------------------------------------------ #
    def setup(self):
        job = self.job
        resume_dir, weights_only = None, False
        if job.checkpoint.resume:
            resume_dir = ckio.find_latest(self.ckpt.root)
        if resume_dir is None and job.checkpoint.load:
            from voxcpm_train.parallel.checkpoint import is_complete_checkpoint

            resume_dir = Path(job.checkpoint.load)
            if not is_complete_checkpoint(resume_dir):
                raise ConfigError(f"checkpoint.load={job.checkpoint.load} is not a complete checkpoint "
                                  f"(no model/ and extra_state.json)")
            # by default a training checkpoint continues its run; anything else (voxcpm-import) gives weights only
            is_run = "stage" in ckio.read_trainer_state(resume_dir)
            want = job.checkpoint.load_weights_only
            if want is False and not is_run:
                raise ConfigError(f"checkpoint.load_weights_only=false but checkpoint.load={job.checkpoint.load} is "
                                  f"not a training checkpoint (a voxcpm-import holds weights only)")
            weights_only = not is_run if want is None else bool(want)
        self.resume_dir = resume_dir
        state = ckio.read_trainer_state(resume_dir) if resume_dir and not weights_only else None

        # where the configured stage starts, and whether this start is a stage switch
        if state is None:
            self.start = StageStart(job.stage.name, 0, 0)
            self.stage_switch = False
        elif state["stage"]["name"] == job.stage.name:
            self.start = StageStart(**state["stage"])
            self.stage_switch = False
        else:
            self.start = StageStart(job.stage.name, state["step"], state["scheduler_samples"])
            self.stage_switch = True
        self.step = state["step"] if state else 0
        self.consumed_samples = state["consumed_samples"] if state else 0
        self.skipped_total = state["skipped_total"] if state else 0
        self.gbs = stage_global_batch(job)
        mbs = job.parallel.micro_batch_size
        if self.gbs % (mbs * self.dp) != 0:
            raise ConfigError(
                f"parallel.global_batch_size={job.parallel.global_batch_size} x stage.global_batch_mult="
                f"{job.stage.global_batch_mult} = {self.gbs} must be a multiple of parallel.micro_batch_size "
                f"({mbs}) x data-parallel size ({self.dp})")
        self.num_microbatches = self.gbs // (mbs * self.dp)
        if self.step >= job.train.max_steps and not self.stage_switch:
            log.info(f"checkpoint at step {self.step} >= train.max_steps={job.train.max_steps}: nothing to do")

        from voxcpm_train.parallel.checkpoint import load_checkpoint
        from voxcpm_train.training.build import build_model_and_optimizer

        self.model_chunks, self.optimizer = build_model_and_optimizer(job, self.platform)
        # the scheduler exists before the load: megatron's load_state_dict with override=True keeps the
        # configured stage values and takes only the consumed samples (num_steps) from the checkpoint
        self.scheduler = build_scheduler(self.optimizer, job, self.start)
        if job.checkpoint.async_save and job.parallel.use_distributed_optimizer:
            log.info("checkpoint.async_save with the distributed optimizer: megatron-core 0.16.1 gathers its "
                     "state (fully_reshardable format) synchronously when a save starts; only the file write "
                     "overlaps training (docs/launch.md)")
        if weights_only:
            # weights only; fp32 main params re-derived from them (fresh optimizer state)
            load_checkpoint(resume_dir, self.model_chunks, self.optimizer, load_optimizer=False, load_rng=False)
            log.info(f"initial weights from {resume_dir} (fresh optimizer, scheduler and data)")
        elif resume_dir is not None:
            res = load_checkpoint(resume_dir, self.model_chunks, self.optimizer, self.scheduler)
            if not res.rng_restored:
                log.info(f"layout changed ({res.saved_layout}): RNG states start fresh")

        from voxcpm_train.training.data import build_data

        from voxcpm_train.training.vae_provenance import latents_vae

        # checked at start-up (config.job.build_job); recorded in every checkpoint for voxcpm-export's check
        self.latents_vae = dict(latents_vae(job), allow_random_init=bool(job.data.encode.allow_random_init))
        self.data = build_data(job, self.dp_rank, self.dp)
        if state is not None and state.get("data") is not None:
            # the loader state counts global micro-batches: valid at any DP size; with another blend
            # (a stage switch) the loader continues every dataset where it stopped
            self.data.load_state_dict(state["data"])
        self.write_config()
        self.metrics = MetricsLogger(self.run_dir, job, enabled=self.env.rank == 0, resume_step=self.step)
        if state is not None:
            what = "stage switch" if self.stage_switch else "resume"
            log.info(f"{what}: loaded {resume_dir} (step {self.step}, {self.consumed_samples} samples); "
                     f"stage {self.start.name!r} starts at step {self.start.step}")

    def _config_yaml(self) -> str:
        if getattr(self, "_config_text", None) is None:    # the job never changes during a run
            self._config_text = OmegaConf.to_yaml(OmegaConf.structured(self.job))
        return self._config_text

    def write_config(self):
        if self.env.rank != 0:
            return
        write_run_assets(self.job, self.run_dir)
        text = self._config_yaml()
        (self.run_dir / "config.yaml").write_text(text)
        (self.run_dir / f"config_{self.job.stage.name}.yaml").write_text(text)

    # ------------------------------------------------------------------------------------------ #
    # checkpoint
    # ------------------------------------------------------------------------------------------ #
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "scheduler_samples": int(self.scheduler.num_steps),
            "skipped_total": self.skipped_total,
            "stage": {"name": self.start.name, "step": self.start.step, "samples": self.start.samples},
            "world": {"tp": self.job.parallel.tp, "pp": self.job.parallel.pp, "dp": self.dp},
            "global_batch_size": self.gbs,
            "latents_vae": self.latents_vae,     # voxcpm-export checks the exported AudioVAE against it
        }

    def save(self, reason: str):
        """Write a checkpoint of the current step. Sync: returns the final dir. Async
        (`checkpoint.async_save`): returns once the state is captured and the writers are forked; the
        checkpoint is committed (COMPLETE, `latest`) by a later `finalize_saves`."""
        from voxcpm_train.parallel.checkpoint import save_checkpoint

        async_save = bool(self.job.checkpoint.async_save)
        t_wait = time.time()
        self.finalize_saves(blocking=True)       # the previous async save first
        t0 = time.time()
        extra = self.trainer_state()
        extra["data"] = self.data.state_dict()   # same on every rank: counts global micro-batches

        def write(tmp: Path):
            if self.env.rank == 0:
                (tmp / "config.yaml").write_text(self._config_yaml())
                link_assets(tmp)   # voxcpm-export reads <ckpt>/hf_assets
            return save_checkpoint(tmp, self.model_chunks, self.optimizer, self.scheduler, extra_state=extra,
                                   async_save=async_save)

        if async_save:
            tmp = self.ckpt.save_async(self.step, write)
            blocked = time.time() - t0
            log.info(f"checkpoint ({reason}) step {self.step} -> {tmp} scheduled (async) in {blocked:.2f}s "
                     f"(+{t0 - t_wait:.2f}s waiting for the previous one)")
            return tmp
        final = self.ckpt.save(self.step, write)
        blocked = time.time() - t0
        log.info(f"checkpoint ({reason}) step {self.step} -> {final} in {blocked:.2f}s")
        return final

    def finalize_saves(self, blocking: bool) -> None:
        """Commit the async saves whose writers are done on every rank (all of them with `blocking`)."""
        if not self.ckpt.pending:
            return
        t0 = time.time()
        n = len(self.ckpt.committed)
        self.ckpt.finalize_pending(blocking=blocking)
        for step, final, age in self.ckpt.committed[n:]:
            log.info(f"checkpoint step {step} committed -> {final} ({age:.2f}s after it was scheduled; "
                     f"finalize {'blocked' if blocking else 'took'} {time.time() - t0:.2f}s)")

    # ------------------------------------------------------------------------------------------ #
    # the loop
    # ------------------------------------------------------------------------------------------ #
    def run(self):
        from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

        from voxcpm_train.parallel.step import train_step
        from voxcpm_train.training.forward import make_forward_step
        from voxcpm_train.training.flops import peak_flops_per_device

        job = self.job
        stopper = StopSignal()
        forward_step = make_forward_step(job.model, self.platform.device)
        seq_len = self.data.seq_length
        mbs = job.parallel.micro_batch_size
        peak = peak_flops_per_device(job.logging.peak_tflops)
        world = self.env.world_size
        last_saved = self.step if self.resume_dir is not None and self.step > 0 else None
        t_start, steps_done = time.time(), 0
        log.info(f"training stage {self.start.name!r}: steps {self.step} -> {job.train.max_steps}, global batch "
                 f"{self.gbs} rows x {seq_len} positions, {self.num_microbatches} micro-batches of {mbs} per "
                 f"rank, tp={job.parallel.tp} pp={job.parallel.pp} dp={self.dp}")
        while self.step < job.train.max_steps:
            self.finalize_saves(blocking=False)     # async checkpoints whose writes are done
            t0 = time.time()
            lr = get_canonical_lr_for_logging(self.optimizer.param_groups)
            counter, seg_counter = self.data.position_counter(), self.data.segment_counter()
            flops_counter = self.data.flops_counter()
            res = train_step(forward_step, self.data, self.model_chunks, self.optimizer, self.scheduler,
                             num_microbatches=self.num_microbatches, seq_length=2 * seq_len,
                             micro_batch_size=mbs, increment=self.gbs)
            self.step += 1
            self.consumed_samples += self.gbs
            self.skipped_total += int(res.skipped)
            dt = time.time() - t0
            steps_done += 1
            tokens, utterances, model_flops = self._global_sums(          # of this step's micro-batches
                self.data.position_counter() - counter, self.data.segment_counter() - seg_counter,
                self.data.flops_counter() - flops_counter)
            n = max(res.num_tokens, 1)
            rec = {
                "step": self.step, "loss": res.loss,
                "loss_diff": res.logs.get("diff_sum", float("nan")) / n,
                "loss_stop": res.logs.get("stop_sum", float("nan")) / n,
                "lr": lr, "grad_norm": res.grad_norm, "skipped": bool(res.skipped),
                "skipped_total": self.skipped_total, "samples_per_s": self.gbs / dt,
                "tokens_per_s": tokens / dt, "utterances_per_s": utterances / dt,
                "loss_positions": res.num_tokens,
                "consumed_samples": self.consumed_samples, "global_batch_size": self.gbs,
                "stage": self.start.name, "max_steps": job.train.max_steps, "step_time_s": dt,
                "model_tflops_per_s": model_flops / dt / 1e12,
                "mfu": (model_flops / dt / (peak * world)) if peak else None,
            }
            eta = (time.time() - t_start) / steps_done * (job.train.max_steps - self.step)
            self.metrics.log_step(rec, eta, console=(self.step % job.logging.log_every == 0
                                                     or self.step == job.train.max_steps or self.step == 1))
            if job.logging.val_every and self.step % job.logging.val_every == 0:
                self.validate()
            if job.logging.sample_every and self.step % job.logging.sample_every == 0:
                self.generate_samples()
            if job.checkpoint.every and self.step % job.checkpoint.every == 0:
                self.save("periodic")
                last_saved = self.step
            if any_rank(stopper.received is not None):
                log.warning(f"received {stopper.name}: checkpointing at step {self.step} and exiting")
                if last_saved != self.step:
                    self.save(f"signal {stopper.name}")
                    last_saved = self.step
                if job.checkpoint.exit_on_signal:
                    self.finalize_saves(blocking=True)
                    self.finish(plot=False)
                    return "signal"
                stopper.reset()
        if job.checkpoint.save_at_end and last_saved != self.step:
            self.save("end")
        self.finalize_saves(blocking=True)
        if job.logging.sample_at_end and steps_done and not (
                job.logging.sample_every and self.step % job.logging.sample_every == 0):
            self.generate_samples()
        self.finish(plot=job.logging.loss_plot)
        return "done"

    def _global_sums(self, *local: int) -> list:
        """Sums of per-rank counts over the data-parallel ranks (the first TP/PP rank of each counts), in one
        all-reduce."""
        counts = (self.ps.get_tensor_model_parallel_rank() == 0 and self.ps.get_pipeline_model_parallel_rank() == 0)
        t = torch.tensor([int(x) if counts else 0 for x in local], dtype=torch.int64, device=comm_device())
        dist.all_reduce(t)
        return [int(x) for x in t.tolist()]

    def validate(self):
        from voxcpm_train.training.evaluate import validation_loss

        rec = validation_loss(self)
        if rec is not None:
            self.metrics.log_val(self.step, rec)

    def generate_samples(self):
        from voxcpm_train.training.evaluate import generate_samples

        generate_samples(self)

    def log_data_readers(self) -> None:
        """Which ranks built a training loader and how many micro-batches each read (collective)."""
        world, rank = self.env.world_size, self.env.rank
        t = torch.zeros(2 * world, dtype=torch.float64, device=comm_device())
        t[rank], t[world + rank] = float(self.data.is_reader), float(self.data.reads)
        dist.all_reduce(t)
        built = [r for r in range(world) if t[r].item() > 0]
        log.info(f"data: training loaders built on ranks {built} of {world}; micro-batches read per rank "
                 f"{[int(x) for x in t[world:].tolist()]} (TP rank 0 reads, broadcasts over the TP group)")

    def finish(self, plot: bool):
        self.log_data_readers()
        if self.env.rank == 0 and plot:
            png = plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png",
                                  self.run_dir / "val_metrics.jsonl")
            if png:
                log.info(f"loss curve -> {png}")
        self.metrics.finish()
        dist.barrier()


def train(job) -> str:
    """Run `job` (a resolved JobConfig) in this process; returns 'done' or 'signal'."""
    trainer = Trainer(job)
    ok = False
    try:
        trainer.setup()
        result = trainer.run()
        ok = True
        return result
    finally:
        if not ok:   # an async write still in flight is killed, never committed (its temp dir stays incomplete)
            trainer.ckpt.abort_pending()
        from voxcpm_train.parallel.state import destroy_model_parallel

        try:
            destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
