"""Move MoE expert weights between expert-parallel sizes, on plain state dicts.

With expert-parallel size P and E experts per layer, rank p stores global expert g = p * (E / P) + i under the
local key `...deepspeed_moe.experts.deepspeed_experts.<i>.<param>`. An ep=1 state dict uses the global id.
Everything that is not an expert weight is replicated across the ranks of a group.
"""

from __future__ import annotations

import re
from collections import defaultdict

EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?deepspeed_moe\.experts\.deepspeed_experts\.)(?P<id>\d+)(?P<rest>\..+)$")


def _experts_per_layer(state: dict) -> dict[str, int]:
    """{layer key prefix: number of experts stored in this state}, checking the ids are 0..n-1."""
    ids: dict[str, set[int]] = defaultdict(set)
    for key in state:
        match = EXPERT_KEY.match(key)
        if match:
            ids[match["prefix"]].add(int(match["id"]))
    for prefix, found in ids.items():
        if found != set(range(len(found))):
            raise ValueError(f"expert ids under {prefix!r} are {sorted(found)}, expected 0..{len(found) - 1}: "
                             "the state dict is incomplete")
    return {prefix: len(found) for prefix, found in ids.items()}


def consolidate_expert_states(rank_states: list[dict]) -> dict:
    """States of the ranks of one expert-parallel group (in group-rank order) -> one ep=1 state."""
    if not rank_states:
        raise ValueError("consolidate_expert_states needs the state of at least one rank")
    local = _experts_per_layer(rank_states[0])
    for rank, state in enumerate(rank_states[1:], start=1):
        if _experts_per_layer(state) != local:
            raise ValueError(f"rank {rank} holds {_experts_per_layer(state)} experts per layer but rank 0 holds "
                             f"{local}: pass the states of one expert-parallel group, in rank order")
    merged = {}
    for rank, state in enumerate(rank_states):
        for key, value in state.items():
            match = EXPERT_KEY.match(key)
            if match:
                global_id = rank * local[match["prefix"]] + int(match["id"])
                merged[f"{match['prefix']}{global_id}{match['rest']}"] = value
            elif rank == 0:
                merged[key] = value
    return merged


def shard_expert_state(full_state: dict, ep_size: int, ep_rank: int) -> dict:
    """An ep=1 state -> the state of rank `ep_rank` in an expert-parallel group of size `ep_size`."""
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must be in [0, ep_size={ep_size})")
    n_experts = _experts_per_layer(full_state)
    for prefix, count in n_experts.items():
        if count % ep_size:
            raise ValueError(f"{count} experts under {prefix!r} cannot be split over expert_parallel_size={ep_size}:"
                             " choose a divisor of the number of experts")
    shard = {}
    for key, value in full_state.items():
        match = EXPERT_KEY.match(key)
        if not match:
            shard[key] = value
            continue
        n_local = n_experts[match["prefix"]] // ep_size
        owner, local_id = divmod(int(match["id"]), n_local)
        if owner == ep_rank:
            shard[f"{match['prefix']}{local_id}{match['rest']}"] = value
    return shard


def experts_per_layer(names) -> dict[str, int]:
    """{layer key prefix: number of experts} among parameter names (ids must be 0..n-1)."""
    return _experts_per_layer(dict.fromkeys(names))


def to_global_key(key: str, n_local: dict[str, int], ep_rank: int) -> str:
    """A rank's local expert key -> its ep=1 (global) key; other keys are returned unchanged.

    n_local: local experts per layer prefix (experts_per_layer of the rank's names)."""
    match = EXPERT_KEY.match(key)
    if not match:
        return key
    return f"{match['prefix']}{ep_rank * n_local[match['prefix']] + int(match['id'])}{match['rest']}"


def relayout_expert_names(names: list[str], n_local: dict[str, int]) -> list[str]:
    """The expert parameter names of one optimizer group (model order: layer, local expert, parameter) as
    they are on a rank holding n_local[layer prefix] experts of each layer: same layers and per-expert
    parameters, ids 0..n-1. Used to read optimizer state saved under another expert-parallel size."""
    layers: dict[str, list[str]] = {}
    for name in names:
        match = EXPERT_KEY.match(name)
        if not match:
            raise ValueError(f"{name!r} is not an expert parameter: expert optimizer groups hold only experts")
        rests = layers.setdefault(match["prefix"], [])
        if match["rest"] not in rests:
            rests.append(match["rest"])
    return [f"{prefix}{i}{rest}" for prefix, rests in layers.items() for i in range(n_local[prefix]) for rest in rests]
