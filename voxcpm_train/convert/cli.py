"""``voxcpm-import SRC_FOLDER DST_CHECKPOINT`` and ``voxcpm-export SRC_CHECKPOINT DST_FOLDER``.

Both run in one process on CPU (torch_dist checkpoints reshard when training loads them).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional


def _setup() -> None:
    # Before megatron is imported: conversion always runs on the CPU platform.
    from voxcpm_train.platform import setup_platform

    setup_platform("cpu")


def _convert(prog: str, run, model_config: Optional[str]) -> int:
    """``run(config)`` with the model preset/YAML ``model_config`` (or None); errors as one line, exit 1."""
    from voxcpm_train.convert.mapping import ConversionError

    config = None
    if model_config:
        from voxcpm_train.config.model import load_model_preset

        config = load_model_preset(model_config)
    start = time.time()
    try:
        out = run(config)
    except (ConversionError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"{prog}: wrote {out} in {time.time() - start:.1f} s")
    return 0


def import_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxcpm-import",
        description="Convert a reference VoxCPM model folder (config.json, model.safetensors, "
        "audiovae.safetensors, tokenizer) into a megatron torch_dist checkpoint that training can start from.",
    )
    parser.add_argument("src", help="reference model folder (what voxcpm's from_local loads)")
    parser.add_argument("dst", help="new checkpoint directory (must not exist or be empty)")
    parser.add_argument(
        "--model-config",
        default=None,
        help="model preset name or YAML (default: derived from the folder's config.json)",
    )
    args = parser.parse_args(argv)
    _setup()
    from voxcpm_train.convert.checkpoint import import_folder

    return _convert("voxcpm-import", lambda config: import_folder(args.src, args.dst, model_config=config),
                    args.model_config)


def export_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxcpm-export",
        description="Write the model weights of a checkpoint (an import or a training checkpoint, "
        "optimizer state ignored) as a reference VoxCPM model folder that voxcpm loads.",
    )
    parser.add_argument("src", help="checkpoint directory (holds model/ and extra_state.json)")
    parser.add_argument("dst", help="output model folder")
    parser.add_argument(
        "--assets",
        default=None,
        help="reference folder supplying config.json extras, audiovae and tokenizer files "
        "(default: SRC/hf_assets, written by voxcpm-import)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="dtype of model.safetensors (default: the checkpoint's)",
    )
    parser.add_argument(
        "--model-config", default=None, help="model preset name or YAML (default: SRC/config.yaml)"
    )
    parser.add_argument(
        "--lora",
        choices=("merge", "adapter"),
        default="merge",
        help="checkpoints of a LoRA run (peft=lora): merge the adapters into the weights (default), or write "
        "only the adapter folder (lora_weights.safetensors + lora_config.json) for voxcpm's lora_weights_path",
    )
    args = parser.parse_args(argv)
    _setup()
    from voxcpm_train.convert.checkpoint import export_checkpoint

    return _convert(
        "voxcpm-export",
        lambda config: export_checkpoint(args.src, args.dst, assets=args.assets, dtype=args.dtype, model_config=config,
                                         lora=args.lora),
        args.model_config,
    )


if __name__ == "__main__":  # python -m voxcpm_train.convert.cli {import,export} ...
    if len(sys.argv) < 2 or sys.argv[1] not in ("import", "export"):
        print("usage: python -m voxcpm_train.convert.cli {import|export} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit((import_main if sys.argv[1] == "import" else export_main)(sys.argv[2:]))
