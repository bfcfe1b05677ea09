"""Export a checkpoint as one consolidated state dict plus its training config, loadable without DeepSpeed.

    export("runs/tiny-cpu", Path("exported/tiny-cpu"), dtype="bf16")

writes DIR/model.safetensors (experts of every expert-parallel rank merged, ZeRO-3 partitions gathered; with
dtype="bf16" the precision policy's weights, routers, residual projections and expert gates, stay float32)
and DIR/config.yaml (the training config; its `model` section rebuilds the network). Load it with
synergy_dist.loading.load_model(DIR).

    export("runs/tiny-cpu", Path("exported/tiny-hf"), fmt="hf")

writes a transformers model directory instead (synergy_dist/hf/export.py): float32 weights, the byte tokenizer
and the model's own source, loadable with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from synergy_dist.checkpoint.consolidate import consolidated_weights
from synergy_dist.checkpoint.store import CheckpointNotFound, check_complete, read_trainer_state, resolve_checkpoint
from synergy_dist.config import config_from_dict, save_config, set_expert_parallel_size
from synergy_dist.model.precision import float32_names
from synergy_dist.model.synergy import SynergyLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("native", "hf")
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"


class ExportError(ValueError):
    """A path that is not a run directory or a complete checkpoint, or an unsupported dtype."""


def export(source: Path, output: Path, dtype: str = "fp32", fmt: str = "native") -> Path:
    """Write the weights of `source` (a run directory: its newest complete checkpoint; or a checkpoint
    directory) in `dtype` and its config into `output` in format `fmt` (native or hf); returns `output`."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if fmt == "hf" and dtype != "fp32":
        raise ExportError("--format hf writes float32 weights (the precision policy keeps some float32); "
                          "drop --dtype, or cast after loading")
    try:
        checkpoint = resolve_checkpoint(Path(source))
    except CheckpointNotFound as err:
        raise ExportError(str(err)) from None
    problem = check_complete(checkpoint)
    if problem is not None:  # a checkpoint directory named directly is not checked by resolve_checkpoint
        raise ExportError(f"checkpoint '{checkpoint}' is incomplete: {problem}; export a complete checkpoint, "
                          "or the run directory (its newest complete one)")
    state = read_trainer_state(checkpoint)
    cfg = config_from_dict(state["config"])
    weights = consolidated_weights(checkpoint, cfg.deepspeed.zero_stage)
    if fmt == "hf":
        try:  # optional: transformers (the `hf` extra) is only needed by this format
            from synergy_dist.hf.export import write_hf_model
        except ImportError as err:
            raise ExportError(f"--format hf needs transformers ({err}): pip install 'synergy-dist[hf]'") from None
        set_expert_parallel_size(cfg, 1)  # the experts of every rank are merged: one process holds them all
        return write_hf_model(cfg.model, weights, Path(output), max_length=cfg.data.seq_len,
                              metadata={"step": str(state["step"]), "checkpoint": str(checkpoint)})
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
