"""Load a SynergyLM for inference from a run directory, a checkpoint directory or an export.

    model, cfg, where = load_model("runs/tiny-cpu")                      # newest complete checkpoint
    model, cfg, where = load_model("runs/tiny-cpu/checkpoints/step_00000100")
    model, cfg, where = load_model("exported/tiny-cpu")                   # synergy-export output

Checkpoints from any world size load: the consolidation (experts of every expert-parallel rank merged,
ZeRO-3 partitions gathered) is synergy-export's, so evaluating a checkpoint and evaluating its export
run the very same weights. The model comes back in eval mode, in float32, with local experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from synergy_dist.config import Config, config_from_dict, model_stacks
from synergy_dist.train.checkpoint import TRAINER_STATE

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"


class LoadError(ValueError):
    """A --checkpoint path that holds no model."""


def _single_process_config(values: dict) -> Config:
    """The saved config with expert parallelism folded back into one process."""
    cfg = config_from_dict(values, ["deepspeed.expert_parallel_size=1"])
    for stack in model_stacks(cfg.model):
        stack.moe.expert_parallel_size = 1
    return cfg


def load_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Config, Path]:
    """(model in eval mode, its training config, the directory the weights came from)."""
    from synergy_dist.cli.export import ExportError, consolidated_state_dict, resolve_checkpoint
    from synergy_dist.model.synergy import SynergyLM

    path = Path(path)
    if not path.exists():
        raise LoadError(f"--checkpoint '{path}' does not exist; pass a run directory, a checkpoint directory "
                        "(RUN_DIR/checkpoints/step_XXXXXXXX) or a synergy-export directory")
    if (path / EXPORT_WEIGHTS).is_file():
        from safetensors.torch import load_file

        cfg = _single_process_config(yaml.safe_load((path / EXPORT_CONFIG).read_text()))
        weights, source = load_file(str(path / EXPORT_WEIGHTS)), path
    else:
        try:
            checkpoint = resolve_checkpoint(path)
        except ExportError as err:
            raise LoadError(f"{err}, or a synergy-export directory (with {EXPORT_WEIGHTS})") from None
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        cfg = _single_process_config(state["config"])
        weights, source = consolidated_state_dict(checkpoint, cfg.deepspeed.zero_stage), checkpoint
    model = SynergyLM(cfg.model)
    # float32 for evaluation whatever the training dtype (bf16 module weights are upcast exactly)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True)
    return model.to(device).eval(), cfg, source
