"""`voxcpm-model info --model PRESET [--json]`: per-component parameter counts of a model preset."""

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


def info(preset: str, overrides: List[str], as_json: bool) -> int:
    from voxcpm_train.config.model import load_model_preset

    cfg = load_model_preset(preset, overrides)
    _init_single_process()
    from voxcpm_train.model.params import meta_model_parameter_counts

    counts = meta_model_parameter_counts(cfg)
    if as_json:
        print(json.dumps({"model": preset, "parameters": counts}, indent=2))
    else:
        width = max(len(k) for k in counts)
        print(f"model {preset} ({cfg.architecture})")
        for name, n in counts.items():
            print(f"  {name:<{width}}  {n:>15,}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="voxcpm-model", description="VoxCPM model tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="per-component parameter counts (meta device, no weights)")
    p_info.add_argument("--model", required=True, help="preset name in configs/model/ or a YAML path")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.add_argument("overrides", nargs="*", help="dotlist overrides without the model. prefix, e.g. lm.num_layers=4")
    args = parser.parse_args(argv)
    from voxcpm_train.config.model import ConfigError

    try:
        return info(args.model, args.overrides, args.json)
    except ConfigError as err:
        print(f"voxcpm-model: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
