"""`voxcpm-model info --model PRESET [--json]`: per-component parameter counts of a model preset;
`--memory` adds the estimated training memory of one device (voxcpm_train.model.memory, docs/lora.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _init_single_process() -> None:
    """A one-process gloo world with megatron's parallel state at TP = PP = 1 (CPU platform)."""
    from voxcpm_train.platform import init_single_process, setup_platform

    setup_platform("cpu")
    init_single_process()


def load_peft_preset(name_or_path: str, overrides: Optional[List[str]] = None):
    """`configs/peft/<name>.yaml` (or a YAML path) as a validated PeftConfig."""
    from voxcpm_train.config import load_preset
    from voxcpm_train.config.peft import PeftConfig, validate_peft_config

    peft = load_preset("peft", PeftConfig, name_or_path, overrides)
    validate_peft_config(peft)
    return peft


def info(preset: str, overrides: List[str], as_json: bool, memory: Optional[dict] = None) -> int:
    from voxcpm_train.config.model import load_model_preset

    cfg = load_model_preset(preset, overrides)
    peft = load_peft_preset(memory["peft"], memory["peft_overrides"]) if memory else None
    _init_single_process()
    from voxcpm_train.model.params import meta_model_parameter_counts

    counts = meta_model_parameter_counts(cfg)
    est = None
    if memory:
        from voxcpm_train.model.memory import estimate_training_memory

        est = estimate_training_memory(
            cfg, peft, row_tokens=memory["row_tokens"], micro_batch_size=memory["micro_batch_size"],
            precision=memory["precision"], recompute=memory["recompute"], recompute_local=memory["recompute_local"],
            cpu_offload=memory["cpu_offload"], offload_fraction=memory["offload_fraction"],
            audio_fraction=memory["audio_fraction"], loss_fraction=memory["loss_fraction"], dp=memory["dp"],
            distributed_optimizer=memory["distributed_optimizer"], tp=memory["tp"],
            sequence_parallel=memory["sequence_parallel"],
        )
    if as_json:
        out = {"model": preset, "parameters": counts}
        if est is not None:
            out["memory"] = {"settings": memory, **est.as_dict()}
        print(json.dumps(out, indent=2))
        return 0
    width = max(len(k) for k in counts)
    print(f"model {preset} ({cfg.architecture})")
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>15,}")
    if est is not None:
        from voxcpm_train.model.memory import format_estimate

        m = memory
        print(f"training memory of one device (estimate; peft={m['peft']}{' ' + ' '.join(m['peft_overrides']) if m['peft_overrides'] else ''}, "
              f"{m['micro_batch_size']} x {m['row_tokens']} positions, {m['precision']}, recompute={m['recompute']}, "
              f"recompute_local={m['recompute_local']}, TP {m['tp']}{' + SP' if m['sequence_parallel'] else ''}, DP {m['dp']}"
              f"{'' if m['distributed_optimizer'] else ' (no distributed optimizer)'}, cpu_offload={m['cpu_offload']}, "
              f"audio/loss fraction {m['audio_fraction']:g}/{m['loss_fraction']:g}; docs/lora.md):")
        print(f"  trainable parameters {est.trainable:,} of {est.parameters:,}"
              + (f" ({est.rank_trainable:,} of {est.rank_parameters:,} on one TP rank)" if m["tp"] > 1 else ""))
        print(format_estimate(est, m["gpu_gib"]))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="voxcpm-model", description="VoxCPM model tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="per-component parameter counts (meta device, no weights)")
    p_info.add_argument("--model", required=True, help="preset name in configs/model/ or a YAML path")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.add_argument("overrides", nargs="*", help="dotlist overrides without the model. prefix, e.g. lm.num_layers=4")
    mem = p_info.add_argument_group("--memory: estimated training memory of one device (PP = 1)")
    mem.add_argument("--memory", action="store_true", help="add the training-memory estimate")
    mem.add_argument("--peft", default="none", help="peft preset in configs/peft/ or a YAML path (default: none)")
    mem.add_argument("--peft-set", action="append", default=[], metavar="KEY=VALUE",
                     help="peft override without the peft. prefix, e.g. lora.rank=16 (repeatable)")
    mem.add_argument("--row-tokens", type=int, default=2048, help="positions per row (data.row_tokens; default 2048)")
    mem.add_argument("--micro-batch-size", type=int, default=1, help="rows per micro-batch (parallel.micro_batch_size)")
    mem.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="optim.precision (default bf16)")
    mem.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                     help="parallel.recompute (TSLM/RALM layers)")
    mem.add_argument("--recompute-local", choices=("none", "full"), default="none",
                     help="parallel.recompute_local (LocEnc/LocDiT layers)")
    mem.add_argument("--dp", type=int, default=1,
                     help="data-parallel size: the distributed optimizer keeps 1/DP of the optimizer state (default 1)")
    mem.add_argument("--no-distributed-optimizer", action="store_true",
                     help="parallel.use_distributed_optimizer=false: every rank keeps the whole optimizer state")
    mem.add_argument("--tp", type=int, default=1, help="parallel.tp: one rank of a tensor-parallel group (default 1)")
    mem.add_argument("--sequence-parallel", action="store_true", help="parallel.sequence_parallel (needs --tp > 1)")
    mem.add_argument("--cpu-offload", action="store_true", help="optim.cpu_offload (megatron HybridDeviceOptimizer)")
    mem.add_argument("--offload-fraction", type=float, default=1.0, help="optim.offload_fraction (default 1.0)")
    mem.add_argument("--audio-fraction", type=float, default=1.0,
                     help="share of positions that are audio (LocEnc input; default 1.0, an upper bound)")
    mem.add_argument("--loss-fraction", type=float, default=1.0,
                     help="share of positions that carry the loss (LocDiT input; default 1.0, an upper bound)")
    mem.add_argument("--gpu-gib", type=float, default=None, help="print whether the estimate fits this many GiB")
    args = parser.parse_args(argv)
    from voxcpm_train.config.model import ConfigError

    if args.dp < 1 or args.tp < 1:
        parser.error(f"--dp {args.dp} --tp {args.tp}: must be >= 1")
    if args.sequence_parallel and args.tp == 1:
        parser.error("--sequence-parallel needs --tp > 1 (as parallel.sequence_parallel)")
    memory = None
    if args.memory:
        memory = {"peft": args.peft, "peft_overrides": args.peft_set, "row_tokens": args.row_tokens,
                  "micro_batch_size": args.micro_batch_size, "precision": args.precision, "recompute": args.recompute,
                  "recompute_local": args.recompute_local, "dp": args.dp, "tp": args.tp,
                  "sequence_parallel": args.sequence_parallel,
                  "distributed_optimizer": not args.no_distributed_optimizer, "cpu_offload": args.cpu_offload,
                  "offload_fraction": args.offload_fraction,
                  "audio_fraction": args.audio_fraction, "loss_fraction": args.loss_fraction, "gpu_gib": args.gpu_gib}
    try:
        return info(args.model, args.overrides, args.json, memory)
    except (ConfigError, ValueError) as err:   # a bad preset, override or layout (e.g. --tp not dividing the heads)
        print(f"voxcpm-model: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
