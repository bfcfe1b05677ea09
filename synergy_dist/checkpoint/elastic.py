"""Elastic resume: load optimizer state written by a different number of ranks and/or a different
expert-parallel size (dense and MoE models; ZeRO-1/2, ZeRO-0 for a new expert-parallel size, and
ZeRO-3 for a new world size: dense models, as DeepSpeed refuses native MoE under ZeRO-3).

DeepSpeed refuses to re-partition ZeRO-1/2 optimizer state for a new world size, and its universal
checkpoint conversion fails for MoE with expert parallelism, so we go through a consolidated form:

    saved partitions  --consolidate-->  {global parameter name: fp32 weight, exp_avg, exp_avg_sq}
                      --reshard------>  this rank's flat partition of every optimizer group

Layout of a ZeRO-1/2 checkpoint written by W ranks with expert-parallel size P (file names and keys:
deepspeed_files.py):
- each optimizer group is one flat fp32 buffer (its parameters concatenated in group order, zero-padded
  at the end) split evenly over the group's data-parallel ranks; rank r's optimizer file holds its slice
  and its Adam moments;
- dense groups are split over all W ranks (in rank order);
- expert ("moe") groups are split over the expert-data-parallel group: the W / P ranks that hold the same
  experts, ranks p, p + P, p + 2P, ... for expert-parallel rank p = r % P;
- rank p's expert-parallel names are local (deepspeed_experts.<i>); global expert = p * (E / P) + i;
- rank 0's model-states file lists every group's parameter names and shapes in flat order, in rank 0's
  local names; every expert-parallel rank has the same local shapes.

ZeRO-0 checkpoints of MoE models hold the whole torch optimizer state once per expert-parallel rank
(state keyed by parameter index in group order); expert
groups list rank p's experts in model order (layer, local expert, parameter). Without expert
parallelism (or with the same expert-parallel size) DeepSpeed loads ZeRO-0 state on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from synergy_dist.checkpoint.deepspeed_files import (
    ZeroPartition,
    model_states_file,
    read_expert_parallel_optimizer,
    read_param_shapes,
    read_zero_partition,
    zero3_model_states_file,
    zero3_state_dict,
)
from synergy_dist.checkpoint.expert_layout import experts_per_layer, relayout_expert_names, to_global_key

ADAM_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


@dataclass
class ConsolidatedOptimizer:
    """Optimizer state of a whole model, independent of how it was partitioned."""

    params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # global name -> ADAM_KEYS tensors
    steps: list[torch.Tensor | None] = field(default_factory=list)  # Adam step of each group (None: no state yet)
    moe_groups: list[bool] = field(default_factory=list)  # whether each optimizer group holds experts


def _load_rank(path: Path, rank: int, zero_stage: int) -> ZeroPartition:
    partition = read_zero_partition(path, rank, zero_stage)
    if partition.alignment_padded:
        raise RuntimeError(f"checkpoint {path}: ZeRO parameter alignment padding is not supported by the "
                           "elastic loader; resume on the world size that wrote it")
    return partition


def consolidate_zero_checkpoint(path: Path, world_size: int, ep_size: int) -> ConsolidatedOptimizer:
    """Merge the ZeRO-1/2 optimizer partitions of a checkpoint written by `world_size` ranks with
    expert-parallel size `ep_size` into per-parameter tensors under global (ep=1) names."""
    if world_size % ep_size:
        raise ValueError(f"checkpoint {path}: expert_parallel_size={ep_size} does not divide its world size "
                         f"{world_size}")
    shapes = read_param_shapes(model_states_file(path))
    ranks = [_load_rank(path, r, zero_stage=2) for r in range(world_size)]
    groups = ranks[0].param_groups
    merged = ConsolidatedOptimizer(moe_groups=[bool(g.get("moe")) for g in groups])
    for g, group_shapes in enumerate(shapes):
        names = list(group_shapes)
        n_local = experts_per_layer(names)
        if merged.moe_groups[g]:  # one flat buffer per expert-parallel rank, over its expert-data-parallel ranks
            owners = {p: list(range(p, world_size, ep_size)) for p in range(ep_size)}
        else:  # one flat buffer over every rank
            owners = {0: list(range(world_size))}
        numel = {name: int(torch.Size(shape).numel()) for name, shape in group_shapes.items()}
        adam = ranks[0].adam.get(g)  # None: no update applied yet in the saved run
        for ep_rank, holders in owners.items():
            flats = {"fp32": torch.cat([ranks[r].fp32[g].float() for r in holders])}
            for key in ADAM_KEYS[1:]:
                flats[key] = (torch.zeros_like(flats["fp32"]) if adam is None else
                              torch.cat([ranks[r].adam[g][key].float() for r in holders]))
            if sum(numel.values()) > flats["fp32"].numel():
                raise RuntimeError(f"checkpoint {path}: optimizer group {g} holds {flats['fp32'].numel()} values but "
                                   f"its parameters need {sum(numel.values())}: the checkpoint does not match the "
                                   "world size it records")
            offset = 0
            for name in names:
                merged.params[to_global_key(name, n_local, ep_rank)] = {
                    key: flats[key][offset:offset + numel[name]].view(group_shapes[name]).clone() for key in ADAM_KEYS}
                offset += numel[name]
        merged.steps.append(None if adam is None else adam["step"].clone())
    return merged


def _local_names(engine: Any, params: list) -> list[str]:
    """This rank's names of parameters (experts under local ids)."""
    return [engine.param_names[p] for p in params]


def _global_names(engine: Any, params: list) -> list[str]:
    """Global (ep=1) names of a group's parameters on this rank."""
    from deepspeed.utils import groups  # deferred: DeepSpeed takes ~1.2 s to import

    names = _local_names(engine, params)
    n_local = experts_per_layer(names)
    if not n_local:
        return names
    ep_rank = groups._get_expert_parallel_rank(params[0].group_name)
    return [to_global_key(name, n_local, ep_rank) for name in names]


def reshard_into_engine(engine: Any, merged: ConsolidatedOptimizer, source: str) -> None:
    """Give this rank its partition of every ZeRO-1/2 optimizer group (fp32 weights, Adam moments and
    step) from the consolidated state, then refresh the model weights from the fp32 masters."""
    zero = engine.optimizer
    inner_groups = zero.optimizer.param_groups
    current_moe = [bool(g.get("moe")) for g in inner_groups]
    if current_moe != merged.moe_groups:
        raise RuntimeError(f"checkpoint {source} has optimizer groups {merged.moe_groups} (True = experts) but the "
                           f"model has {current_moe}: it was written for a different model configuration")
    if any(any(padding) for padding in zero.round_robin_bit16_padding):
        raise RuntimeError(f"cannot resume {source} elastically: this ZeRO configuration pads between parameters in "
                           "the flat optimizer buffers; resume on the world size that wrote the checkpoint")
    for g, inner_group in enumerate(inner_groups):
        names = _global_names(engine, zero.round_robin_bit16_groups[g])
        missing = [n for n in names if n not in merged.params]
        if missing:
            raise RuntimeError(f"checkpoint {source} has no optimizer state for {missing[:3]} "
                               f"({len(missing)} parameters): it was written for a different model configuration")
        partition = zero.single_partition_of_fp32_groups[g]
        size = partition.numel()
        dp_group = zero.real_dp_process_group[g]
        rank, ranks = dist.get_rank(group=dp_group), dist.get_world_size(group=dp_group)
        state = {}
        for key in ADAM_KEYS:
            flat = torch.cat([merged.params[n][key].reshape(-1) for n in names])
            padded = torch.zeros(size * ranks)
            padded[:flat.numel()] = flat
            state[key] = padded[rank * size:(rank + 1) * size].to(partition.device, partition.dtype)
        partition.data.copy_(state["fp32"])
        flat_param = inner_group["params"][0]
        if merged.steps[g] is None:  # Adam creates its state at the first applied update, as in the saved run
            zero.optimizer.state.pop(flat_param, None)
        else:
            zero.optimizer.state[flat_param] = {
                "step": merged.steps[g].clone(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
    zero.update_lp_params()  # model weights = the restored fp32 masters (all-gathered over the ranks)
    zero._link_all_hp_params()  # per-parameter views into the new partitions ...
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()  # ... and into the new Adam state (safe_get_full_optimizer_state)


# ----------------------------------------------------------------------------- ZeRO-0


def consolidate_stage0_checkpoint(engine: Any, path: Path, ep_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """{global parameter name: its torch optimizer state} of a ZeRO-0 MoE checkpoint written with
    expert-parallel size `ep_size`, read with the current model's parameter groups as the key."""
    from deepspeed.utils import groups  # deferred: DeepSpeed takes ~1.2 s to import

    current = engine.optimizer.param_groups
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for ep_rank in range(ep_size):
        saved = read_expert_parallel_optimizer(path, ep_rank, ep_size)
        if len(saved["param_groups"]) != len(current):
            raise RuntimeError(f"checkpoint {path} has {len(saved['param_groups'])} optimizer groups but the model "
                               f"has {len(current)}: it was written for a different model configuration")
        for saved_group, group in zip(saved["param_groups"], current):
            names = _local_names(engine, group["params"])
            if saved_group.get("moe"):
                n_experts = experts_per_layer(names)
                per_rank = {prefix: n * groups._get_expert_parallel_world_size(group["params"][0].group_name)
                            // ep_size for prefix, n in n_experts.items()}
                names = [to_global_key(name, per_rank, ep_rank)
                         for name in relayout_expert_names(names, per_rank)]
            elif ep_rank > 0:
                continue  # dense state is the same in every file
            if len(names) != len(saved_group["params"]):
                raise RuntimeError(f"checkpoint {path}: optimizer group {saved_group.get('name')!r} holds "
                                   f"{len(saved_group['params'])} parameters where the model expects {len(names)}")
            for name, index in zip(names, saved_group["params"]):
                if index in saved["state"]:
                    merged[name] = saved["state"][index]
    return merged


def load_stage0_resharded(engine: Any, merged: dict[str, dict[str, torch.Tensor]], source: str) -> None:
    """Give this rank's parameters their optimizer state from the consolidated ZeRO-0 state."""
    optimizer = engine.optimizer
    for group in optimizer.param_groups:
        for name, param in zip(_global_names(engine, group["params"]), group["params"]):
            if name not in merged:
                continue  # no step taken yet in the saved run: the state starts empty, as it did there
            state = {key: value.clone() for key, value in merged[name].items()}
            if state["exp_avg"].shape != param.shape:
                raise RuntimeError(f"checkpoint {source}: optimizer state of {name} has shape "
                                   f"{tuple(state['exp_avg'].shape)}, the parameter {tuple(param.shape)}")
            optimizer.state[param] = {k: v.to(param.device) if k != "step" else v for k, v in state.items()}


# ----------------------------------------------------------------------------- ZeRO-3


def consolidate_zero3_checkpoint(path: Path, world_size: int) -> ConsolidatedOptimizer:
    """Merge the ZeRO-3 partitions of a checkpoint written by `world_size` ranks into per-parameter tensors.

    ZeRO-3 splits every parameter on its own: flattened, zero-padded to a multiple of the world size, and
    cut into equal slices, rank r holding slice r. A rank's flat fp32 buffer of an optimizer group is its
    slices of the group's parameters in order (the parameter shapes of rank 0's model-states file give that
    order), and the Adam moments of the group have the same layout.
    """
    return _merge_zero3(path, [_load_rank(path, r, zero_stage=3) for r in range(world_size)])


def _merge_zero3(path: Path, ranks: list[ZeroPartition]) -> ConsolidatedOptimizer:
    """consolidate_zero3_checkpoint on the already loaded optimizer files of every saved rank."""
    world_size = len(ranks)
    model_file = zero3_model_states_file(path, 0)
    if not model_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} lacks {model_file.name}: it is not a complete ZeRO-3 checkpoint; "
                                "resume from another checkpoint")
    shapes = read_param_shapes(model_file)
    if len(ranks[0].fp32) != len(shapes):
        raise RuntimeError(f"checkpoint {path} holds {len(ranks[0].fp32)} ZeRO-3 sub-groups for "
                           f"{len(shapes)} parameter groups (zero_optimization.sub_group_size split them): the elastic "
                           "loader needs one sub-group per group; resume on the world size that wrote it")
    merged = ConsolidatedOptimizer(moe_groups=[False] * len(shapes))
    for g, group_shapes in enumerate(shapes):
        adam = ranks[0].adam.get(g)  # None: no update applied yet in the saved run
        flats = []
        for r in range(world_size):
            flat = {"fp32": ranks[r].fp32[g].float()}
            for key in ADAM_KEYS[1:]:
                flat[key] = (torch.zeros_like(flat["fp32"]) if adam is None else ranks[r].adam[g][key].float())
            flats.append(flat)
        offset = 0
        for name, shape in group_shapes.items():
            numel = int(torch.Size(shape).numel())
            part = -(-numel // world_size)
            merged.params[name] = {
                key: torch.cat([f[key][offset:offset + part] for f in flats])[:numel].view(shape).clone()
                for key in ADAM_KEYS
            }
            offset += part
        if offset != flats[0]["fp32"].numel():
            raise RuntimeError(f"checkpoint {path}: ZeRO-3 group {g} holds {flats[0]['fp32'].numel()} values per rank "
                               f"but its parameters need {offset} at world size {world_size}: the checkpoint does not "
                               "match the world size it records")
        merged.steps.append(None if adam is None else adam["step"].clone())
    return merged


def load_zero3_resharded(engine: Any, path: Path, saved_world: int) -> None:
    """Collective: resume a ZeRO-3 checkpoint written by `saved_world` ranks on this world size.

    Each rank cuts its slice of every parameter (and of its Adam moments) out of the consolidated state
    and hands DeepSpeed the state dict it would have saved at this world size; DeepSpeed then restores
    the fp32 partitions, the Adam state and the model weights from it."""
    ranks = [_load_rank(path, r, zero_stage=3) for r in range(saved_world)]
    merged = _merge_zero3(path, ranks)
    zero = engine.optimizer
    saved = ranks[0]  # loss-scaler state and optimizer hyperparameters, the same on every rank
    if len(zero.fp16_groups) != len(zero.optimizer.param_groups):
        raise RuntimeError(f"cannot resume {path} elastically: zero_optimization.sub_group_size splits this "
                           "model's parameter groups; resume on the world size that wrote the checkpoint")
    if len(zero.fp16_groups) != len(merged.steps):
        raise RuntimeError(f"checkpoint {path} has {len(merged.steps)} optimizer groups but the model has "
                           f"{len(zero.fp16_groups)}: it was written for a different model configuration")
    rank, world = dist.get_rank(), dist.get_world_size()
    flat_groups, state = [], {}
    for g, params in enumerate(zero.fp16_groups):
        names = _local_names(engine, params)
        missing = [n for n in names if n not in merged.params]
        if missing:
            raise RuntimeError(f"checkpoint {path} has no optimizer state for {missing[:3]} ({len(missing)} "
                               "parameters): it was written for a different model configuration")
        slices = {key: [] for key in ADAM_KEYS}
        for name, param in zip(names, params):
            part = param.ds_tensor.ds_numel  # this world size's slice length
            for key in ADAM_KEYS:
                full = torch.zeros(part * world)
                value = merged.params[name][key].reshape(-1)
                full[:value.numel()] = value
                slices[key].append(full[rank * part:(rank + 1) * part])
        flat = {key: torch.cat(slices[key]) for key in ADAM_KEYS}
        if flat["fp32"].numel() != zero.fp32_partitioned_groups_flat[g].numel():
            raise RuntimeError(f"cannot resume {path} elastically: ZeRO-3 group {g} has "
                               f"{zero.fp32_partitioned_groups_flat[g].numel()} values on this rank where the "
                               f"parameters' slices make {flat['fp32'].numel()}")
        flat_groups.append(flat["fp32"])
        if merged.steps[g] is not None:
            state[g] = {"step": merged.steps[g].clone(), "exp_avg": flat["exp_avg"], "exp_avg_sq": flat["exp_avg_sq"]}
    zero._rigid_load_state_dict(zero3_state_dict(saved, state, flat_groups), load_optimizer_states=True)
