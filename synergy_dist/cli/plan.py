"""`synergy-plan CONFIG --gpus N --gpu-memory 80GiB [key=value ...] [--micro-batch M] [--json OUT]`

Prints what a training config needs before any GPU is touched: parameters (total, active per byte,
experts), memory per GPU (float32 weights, gradients and AdamW moments under the configured ZeRO stage
and expert parallelism, bf16 autocast weight copies, activations at the micro-batch, DeepSpeed buffers)
and model FLOPs per byte, and warns when the plan does not fit. The model is built on the meta device:
no memory is allocated, so a plan for a 100B-parameter config runs on a laptop.

    synergy-plan configs/synergy-1b.yaml --gpus 8 --gpu-memory 80GiB
    synergy-plan configs/moe-8b-a1b.yaml --gpus 16 --gpu-memory 141GiB batch.micro_batch_size=2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synergy_dist.config import ConfigError, load_config
from synergy_dist.plan import PlanError, format_plan, make_plan, misfit_warning, parse_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synergy-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a training config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. deepspeed.zero_stage=3")
    parser.add_argument("--gpus", type=int, required=True, help="total number of GPUs (all nodes)")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB (default), 141GB")
    parser.add_argument("--micro-batch", type=int, default=None, help="override batch.micro_batch_size")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg, args.gpus, parse_memory(args.gpu_memory), args.micro_batch)
    except (ConfigError, PlanError) as err:
        print(f"synergy-plan: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, str(args.config)))
    warning = misfit_warning(plan)
    if warning:
        print(f"synergy-plan: {warning}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(plan.to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
