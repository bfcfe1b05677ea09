"""Export a checkpoint as one consolidated state dict plus its training config, loadable without DeepSpeed.

    export("runs/tiny-cpu", Path("exported/tiny-cpu"), dtype="bf16")

writes DIR/model.safetensors (experts of every expert-parallel rank merged, ZeRO-3 partitions gathered; with
dtype="bf16" the precision policy's weights, routers, residual projections and expert gates, stay float32)
and DIR/config.yaml (the training config; its `model` section rebuilds the network). Load it with
synergy_dist.loading.load_model(DIR).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from synergy_dist.checkpoint.consolidate import consolidated_weights
from synergy_dist.checkpoint.store import CheckpointNotFound, read_trainer_state, resolve_checkpoint
from synergy_dist.config import config_from_dict, save_config, set_expert_parallel_size
from synergy_dist.model.precision import float32_names
from synergy_dist.model.synergy import SynergyLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"


class ExportError(ValueError):
    """A path that is not a run directory or a complete checkpoint, or an unsupported dtype."""


def export(source: Path, output: Path, dtype: str = "fp32") -> Path:
    """Write the weights of `source` (a run directory: its newest complete checkpoint; or a checkpoint
    directory) in `dtype` and its config into `output`; returns `output`."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    try:
        checkpoint = resolve_checkpoint(Path(source))
    except CheckpointNotFound as err:
        raise ExportError(str(err)) from None
    state = read_trainer_state(checkpoint)
    cfg = config_from_dict(state["config"])
    weights = consolidated_weights(checkpoint, cfg.deepspeed.zero_stage)
    kept = policy_names(state["config"]) if dtype != "fp32" else set()
    weights = {k: v.detach().to(torch.float32 if k in kept else DTYPES[dtype]).contiguous() for k, v in weights.items()}
    output.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(output / EXPORT_WEIGHTS),
              metadata={"step": str(state["step"]), "checkpoint": str(checkpoint), "dtype": dtype})
    save_config(cfg, output / EXPORT_CONFIG)
    return output


def policy_names(config: dict) -> set[str]:
    """Weight names the precision policy keeps in float32 (model/precision.py), so that a bf16 export routes
    like the checkpoint. Read off the model built on the meta device (no memory, no initialisation cost)."""
    cfg = config_from_dict(config)
    set_expert_parallel_size(cfg, 1)  # a single-process model: no expert-parallel groups needed
    with torch.device("meta"):
        return float32_names(SynergyLM(cfg.model))
