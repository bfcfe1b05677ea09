"""Load a SynergyLM for inference from a run directory, a checkpoint directory or an export.

    model, cfg, where = load_model("runs/tiny-cpu")                      # newest complete checkpoint
    model, cfg, where = load_model("runs/tiny-cpu/checkpoints/step_00000100")
    model, cfg, where = load_model("exported/tiny-cpu")                   # synergy-export output

Checkpoints from any world size load (checkpoint/consolidate.py merges the experts of every
expert-parallel rank and gathers ZeRO-3 partitions, as export does), so evaluating a checkpoint and
evaluating its export run the very same weights. The model comes back in eval mode, in float32, with
every expert local (expert_parallel_size=1).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from synergy_dist.checkpoint.consolidate import consolidated_weights
from synergy_dist.checkpoint.store import CheckpointNotFound, read_trainer_state, resolve_checkpoint
from synergy_dist.config import Config, config_from_dict, set_expert_parallel_size
from synergy_dist.export import EXPORT_CONFIG, EXPORT_WEIGHTS
from synergy_dist.model.synergy import SynergyLM


class LoadError(ValueError):
    """A --checkpoint path that holds no model."""


def single_process_config(values: dict) -> Config:
    """A saved training config with expert parallelism folded back into one process."""
    cfg = config_from_dict(values)
    set_expert_parallel_size(cfg, 1)
    return cfg


def load_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Config, Path]:
    """(model in eval mode, its training config, the directory the weights came from)."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"--checkpoint '{path}' does not exist; pass a run directory, a checkpoint directory "
                        "(RUN_DIR/checkpoints/step_XXXXXXXX) or a synergy-export directory")
    if (path / EXPORT_WEIGHTS).is_file():
        cfg = single_process_config(yaml.safe_load((path / EXPORT_CONFIG).read_text()))
        weights, source = load_file(str(path / EXPORT_WEIGHTS)), path
    else:
        try:
            checkpoint = resolve_checkpoint(path)
        except CheckpointNotFound as err:
            raise LoadError(f"{err}, or a synergy-export directory (with {EXPORT_WEIGHTS})") from None
        cfg = single_process_config(read_trainer_state(checkpoint)["config"])
        weights, source = consolidated_weights(checkpoint, cfg.deepspeed.zero_stage), checkpoint
    model = SynergyLM(cfg.model)
    # float32 for evaluation whatever the training dtype (bf16 module weights are upcast exactly)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True)
    return model.to(device).eval(), cfg, source
