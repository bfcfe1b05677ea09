"""`synergy-export RUN_DIR|CHECKPOINT_DIR --output DIR [--dtype fp32|bf16]`

Writes DIR/model.safetensors (one consolidated state dict: experts of every expert-parallel rank
merged, ZeRO-3 partitions gathered) and DIR/config.yaml (the training config; its `model` section
rebuilds the network). Load it without DeepSpeed:

    from synergy_dist.cli.export import load_exported
    model = load_exported("DIR")          # a SynergyLM in eval mode, expert_parallel_size=1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from synergy_dist.config import config_from_dict, model_stacks, save_config
from synergy_dist.train.checkpoint import TRAINER_STATE, find_latest_complete

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """A path that is not a run directory or a complete checkpoint."""


def resolve_checkpoint(path: Path) -> Path:
    """A complete checkpoint directory, given it or a run directory (newest complete one)."""
    if (path / TRAINER_STATE).is_file():
        return path
    found = find_latest_complete(path / "checkpoints")
    if found is None:
        raise ExportError(f"'{path}' is neither a checkpoint directory nor a run directory with a complete "
                          "checkpoint under checkpoints/; pass RUN_DIR or RUN_DIR/checkpoints/step_XXXXXXXX")
    return found


def consolidated_state_dict(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full model weights: the dense module state plus every expert file (saved under global expert ids)."""
    if zero_stage == 3:  # parameters live only in the ZeRO-3 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    merged = dict(states["module"])
    for expert_file in sorted(checkpoint.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        merged.update(torch.load(expert_file, map_location="cpu", weights_only=False))
    return merged


def export(source: Path, output: Path, dtype: str = "fp32") -> Path:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    checkpoint = resolve_checkpoint(Path(source))
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    cfg = config_from_dict(state["config"])
    weights = consolidated_state_dict(checkpoint, cfg.deepspeed.zero_stage)
    weights = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in weights.items()}
    output.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(weights, str(output / "model.safetensors"),
              metadata={"step": str(state["step"]), "checkpoint": str(checkpoint), "dtype": dtype})
    save_config(cfg, output / "config.yaml")
    return output


def load_exported(directory: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Rebuild the SynergyLM of an export (experts local: expert_parallel_size=1) and load its weights."""
    from safetensors.torch import load_file

    from synergy_dist.model.synergy import SynergyLM

    directory = Path(directory)
    values = yaml.safe_load((directory / "config.yaml").read_text())
    cfg = config_from_dict(values, ["deepspeed.expert_parallel_size=1"])
    for stack in model_stacks(cfg.model):
        stack.moe.expert_parallel_size = 1
    model = SynergyLM(cfg.model)
    weights = load_file(str(directory / "model.safetensors"), device=device)
    model.load_state_dict({k: v.to(next(model.parameters()).dtype) if v.is_floating_point() else v
                           for k, v in weights.items()}, strict=True)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synergy-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="run directory (newest complete checkpoint) or checkpoint directory")
    parser.add_argument("--output", type=Path, required=True, help="directory for model.safetensors + config.yaml")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.output, args.dtype)
    except ExportError as err:
        print(f"synergy-export: {err}", file=sys.stderr)
        return 2
    print(f"synergy-export: wrote {out / 'model.safetensors'} and {out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
