"""DeepSpeed's checkpoint files: their names, the keys inside them, and readers that return typed contents.

What `engine.save_checkpoint(root, tag)` writes into root/tag (DeepSpeed's defaults, no model parallelism):

    mp_rank_00_model_states.pt                       rank 0: "module" (the dense state dict; under ZeRO-3
                                                     empty placeholders) and "param_shapes" (each optimizer
                                                     group's parameter names and shapes, in flat order,
                                                     in rank 0's local names)
    zero_pp_rank_<r>_mp_rank_00_model_states.pt      ZeRO-3, rank r: the same keys ("param_shapes" included)
    zero_pp_rank_<r>_mp_rank_00_optim_states.pt      ZeRO-1/2/3, rank r: "optimizer_state_dict", this rank's
                                                     partition of every optimizer group and its Adam moments
    layer_<l>_expert_<g>_mp_rank_00_model_states.pt  MoE: the weights of expert g (global id) of MoE layer l
    expp_rank_<p>_mp_rank_00_optim_states.pt         ZeRO-0 with MoE: the whole torch optimizer state of
                                                     expert-parallel rank p ("optimizer")

Every other module reads these files through this one, weights-only (safe_load.py): reading a
checkpoint never runs code from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synergy_dist.checkpoint import safe_load

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_STATES_GLOB = "layer_*_expert_*_mp_rank_00_model_states.pt"


def model_states_file(checkpoint: Path) -> Path:
    return checkpoint / MODEL_STATES


def zero3_model_states_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def zero_optimizer_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def expert_states_file(checkpoint: Path, layer: int, expert: int) -> Path:
    """The weights of expert `expert` (global id) of MoE layer `layer`."""
    return checkpoint / f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def expert_parallel_optimizer_file(checkpoint: Path, ep_rank: int) -> Path:
    """ZeRO-0 with MoE: the torch optimizer state of expert-parallel rank `ep_rank`."""
    return checkpoint / f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def _load(file: Path) -> Any:
    return safe_load.load(file)


# ----------------------------------------------------------------------------- writing


@dataclass
class SaveRecord:
    """What this rank's engine.save_checkpoint wrote, and the writes that failed."""

    written: list[Path]
    failures: list[tuple[Path, Exception]]


@contextmanager
def recording_saves(engine: Any, is_write_error: Callable[[Exception], bool]) -> Iterator[SaveRecord]:
    """Inside the block, every file the engine's checkpoint engine writes (DeepSpeed writes all its checkpoint
    files through `engine.checkpoint_engine.save(state_dict, path)`) is recorded. A write that fails with an
    error `is_write_error` accepts (disk full, ...) is recorded instead of raised, so that this rank still
    reaches the collectives inside engine.save_checkpoint and no other rank waits for it forever."""
    record = SaveRecord(written=[], failures=[])
    checkpoint_engine = engine.checkpoint_engine
    original, shadowed = checkpoint_engine.save, vars(checkpoint_engine).get("save")

    def save(state_dict, path):
        try:
            original(state_dict, path)
        except Exception as err:
            if not is_write_error(err):
                raise
            record.failures.append((Path(path), err))
        else:
            record.written.append(Path(path))

    checkpoint_engine.save = save  # on this instance only, for the duration of the block
    try:
        yield record
    finally:
        if shadowed is None:
            del checkpoint_engine.save
        else:
            checkpoint_engine.save = shadowed


# ----------------------------------------------------------------------------- model states


def read_param_shapes(file: Path) -> list[dict[str, torch.Size]]:
    """{parameter name: shape} of every optimizer group, in flat-buffer order, from a model-states file."""
    return _load(file)["param_shapes"]


def read_module_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The dense module state dict of rank 0 (without ZeRO-3; experts live in their own files)."""
    return dict(_load(model_states_file(checkpoint))["module"])


def read_expert_states(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights of every expert of every MoE layer, keyed by global expert id."""
    merged: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob(EXPERT_STATES_GLOB)):
        merged.update(_load(file))
    return merged


def read_zero3_fp32_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights gathered from the ZeRO-3 partitions of every rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # deferred: heavy (~1.2 s)

    with safe_load.weights_only_loads(checkpoint):  # zero_to_fp32 asks torch.load for weights_only=False
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))


# ----------------------------------------------------------------------------- optimizer partitions


@dataclass
class ZeroPartition:
    """One rank's ZeRO optimizer file: its slice of every optimizer group."""

    fp32: list[torch.Tensor]  # flat fp32 slice of each optimizer group (ZeRO-3: of each sub-group)
    adam: dict[int, dict[str, torch.Tensor]]  # group -> step, exp_avg, exp_avg_sq (absent: no update applied yet)
    param_groups: list[dict]  # the torch optimizer's param groups (hyperparameters, "moe" flag)
    alignment_padded: bool  # ZeRO-1/2 padded parameters to an alignment inside the flat buffers
    raw: dict  # the whole "optimizer_state_dict", for handing back to DeepSpeed


def read_zero_partition(checkpoint: Path, rank: int, zero_stage: int) -> ZeroPartition:
    """Rank `rank`'s ZeRO-1/2 (zero_stage 1 or 2) or ZeRO-3 optimizer partition."""
    file = zero_optimizer_file(checkpoint, rank)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} lacks {file.name}: it is incomplete for the world size it "
                                "records; resume from another checkpoint")
    state = _load(file)["optimizer_state_dict"]
    padded = any(any(p) for p in state.get("param_alignment_paddings", [[]]))
    if zero_stage == 3:
        inner = state["optimizer_state_dict"]
        return ZeroPartition(fp32=state["fp32_flat_groups"], adam=inner["state"], param_groups=inner["param_groups"],
                             alignment_padded=padded, raw=state)
    base = state["base_optimizer_state"]
    return ZeroPartition(fp32=state["single_partition_of_fp32_groups"], adam=base["state"],
                         param_groups=base["param_groups"], alignment_padded=padded, raw=state)


def zero3_state_dict(saved: ZeroPartition, adam: dict[int, dict[str, torch.Tensor]],
                     fp32: list[torch.Tensor]) -> dict:
    """The ZeRO-3 optimizer state dict DeepSpeed's loader takes (`_rigid_load_state_dict`): this rank's
    `fp32` partitions and `adam` state, with the loss-scaler state and hyperparameters of `saved`."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT  # heavy (~1.2 s)

    inner = {"state": adam, "param_groups": saved.param_groups}
    return {LOSS_SCALER: saved.raw[LOSS_SCALER], "dynamic_loss_scale": saved.raw["dynamic_loss_scale"],
            "overflow": saved.raw["overflow"], OPTIMIZER_STATE_DICT: inner, FP32_FLAT_GROUPS: fp32}


def read_expert_parallel_optimizer(checkpoint: Path, ep_rank: int, ep_size: int) -> dict:
    """ZeRO-0 with MoE: the torch optimizer state dict saved by expert-parallel rank `ep_rank`."""
    file = expert_parallel_optimizer_file(checkpoint, ep_rank)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} lacks {file.name}: it is incomplete for "
                                f"expert_parallel_size={ep_size}; resume from another checkpoint")
    return _load(file)["optimizer"]
