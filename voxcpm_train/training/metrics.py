"""Per-step metrics: console progress line, run.dir/metrics.jsonl (one object per optimizer step), wandb."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger("voxcpm_train")


def fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Rank-0 sink of the training metrics. Other ranks get a disabled instance."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        self.path = Path(run_dir) / "metrics.jsonl"
        self.val_path = Path(run_dir) / "val_metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(self.path, resume_step)
        self._truncate_after(self.val_path, resume_step)
        if cfg.logging.wandb:
            self._init_wandb(run_dir, cfg)

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        """Drop lines of steps after the resumed checkpoint (they will be redone)."""
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue
        path.write_text("".join(k + "\n" for k in keep))

    def _init_wandb(self, run_dir: Path, cfg) -> None:
        mode = os.environ.get("WANDB_MODE", cfg.logging.wandb_mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb not installed: logging to metrics.jsonl only")
            return
        from omegaconf import OmegaConf

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id_file = Path(run_dir) / "wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
        if run_id is None:
            import secrets

            run_id = secrets.token_hex(4)
            run_id_file.write_text(run_id)
        self.wandb = wandb.init(
            project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
            name=cfg.run.name or Path(run_dir).name, id=run_id, resume="allow", mode=mode,
            dir=str(run_dir), config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
            if not isinstance(cfg, dict) else cfg)

    def log_step(self, rec: dict, eta_s: Optional[float], console: bool) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log({k if "/" in k else f"train/{k}": v for k, v in rec.items() if k != "step"},
                           step=rec["step"])
        if console:
            mfu = f" mfu {rec['mfu'] * 100:.1f}%" if rec.get("mfu") is not None else ""
            skip = f" skipped {rec['skipped_total']}" if rec.get("skipped_total") else ""
            log.info(
                f"[{rec['stage']}] step {rec['step']}/{rec['max_steps']} | loss {rec['loss']:.4f} "
                f"(diff {rec['loss_diff']:.4f} stop {rec['loss_stop']:.4f}) | grad {rec['grad_norm']:.3f} "
                f"| lr {rec['lr']:.3e} | {rec['samples_per_s']:.2f} samples/s {rec['tokens_per_s']:.0f} tok/s"
                f"{mfu}{skip} | ETA {fmt_duration(eta_s or 0)}")

    def log_val(self, step: int, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.val_path, "a") as f:
            f.write(json.dumps({"step": step, **rec}) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"val/{k}": v for k, v in rec.items()}, step=step)
        log.info(f"validation step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in rec.items()))

    def log_audio(self, step: int, name: str, wav_path: Path, png_path: Optional[Path], sr: int) -> None:
        if not self.enabled or self.wandb is None:
            return
        import wandb

        items = {f"samples/{name}": wandb.Audio(str(wav_path), sample_rate=sr)}
        if png_path is not None:
            items[f"samples/{name}_mel"] = wandb.Image(str(png_path))
        self.wandb.log(items, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def plot_loss_curve(metrics_path: Path, out_png: Path, val_path: Optional[Path] = None) -> Optional[Path]:
    """Loss curve (total, diff, stop; validation if present) with stage boundaries, as a PNG."""
    if not Path(metrics_path).is_file():
        return None
    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, label in (("loss", "loss"), ("loss_diff", "loss/diff"), ("loss_stop", "loss/stop")):
        ax.plot(steps, [r[key] for r in rows], label=label, lw=1)
    if val_path is not None and Path(val_path).is_file():
        vals = [json.loads(l) for l in Path(val_path).read_text().splitlines() if l.strip()]
        if vals:
            ax.plot([v["step"] for v in vals], [v["loss"] for v in vals], "o-", label="val loss", lw=1)
    prev = rows[0].get("stage")
    for r in rows[1:]:
        if r.get("stage") != prev:
            for a in (ax, ax2):
                a.axvline(r["step"] - 0.5, color="gray", ls="--", lw=0.8)
            ax.text(r["step"], ax.get_ylim()[1], r.get("stage", ""), va="top", fontsize=8)
            prev = r.get("stage")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.plot(steps, [r["lr"] for r in rows], color="k", lw=1)
    ax2.set_ylabel("lr")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
