"""The expert gate of an MoE layer and token-choice top-k routing: scores, selection, capacity, jitter.

The gate's weight and logits stay float32 whatever the model's dtype (small logit differences decide routing).
Everything but the gate module is a pure function of float32 tensors so it can be checked by hand in tests.
Notation: N routed tokens, E experts, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synergy_dist.model.precision import KeepsFloat32, compute_dtype


@dataclass
class Routing:
    """The routing decision for N tokens."""

    expert_ids: torch.Tensor  # (N, k) long, chosen experts, best first
    gates: torch.Tensor  # (N, k) float32, combine weights of the chosen experts (sum to 1 per token)
    probs: torch.Tensor  # (N, E) float32, normalised router probabilities (used by the aux loss)


class ExpertGate(KeepsFloat32, nn.Module):
    """Linear scores of each expert, kept and computed in float32 (the precision policy, model/precision.py).

    A plain parameter rather than nn.Linear: DeepSpeed's torch_autocast mode marks nn.Linear weights for bf16
    gradient communication, and generic Linear re-initialisers would overwrite the small gate init.
    """

    float32_role = "MoE router"

    def __init__(self, d_model: int, n_experts: int, init_std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model, dtype=torch.float32))
        nn.init.normal_(self.weight, 0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.require_float32()
        return router_logits(x, self.weight)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits in float32 (float64 for a float64 weight), outside any autocast region."""
    dtype = compute_dtype(weight.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype))


def route_softmax(logits: torch.Tensor, top_k: int) -> Routing:
    """Mixtral routing: softmax over the top-k logits (= full softmax renormalised over the top-k)."""
    probs = torch.softmax(logits, dim=-1)
    top_logits, expert_ids = torch.topk(logits, top_k, dim=-1)
    gates = torch.softmax(top_logits, dim=-1)
    return Routing(expert_ids=expert_ids, gates=gates, probs=probs)


def route_sigmoid_bias(logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor) -> Routing:
    """DeepSeek-V3 routing: sigmoid affinities; the bias only changes WHICH experts win, never the gates."""
    scores = torch.sigmoid(logits)
    _, expert_ids = torch.topk(scores + selection_bias.to(scores.dtype), top_k, dim=-1)
    chosen = scores.gather(-1, expert_ids)
    gates = chosen / chosen.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return Routing(expert_ids=expert_ids, gates=gates, probs=probs)


def expert_capacity(n_tokens: int | torch.Tensor, top_k: int, n_experts: int, factor: float,
                    min_capacity: int) -> int | torch.Tensor:
    """Assignments one expert accepts: ceil(factor * tokens * k / E), at least min_capacity. A tensor count (the
    valid tokens of a padded batch) gives a tensor, so the capacity never needs the count on the host."""
    if isinstance(n_tokens, torch.Tensor):
        return torch.ceil(factor * n_tokens.to(torch.float64) * top_k / n_experts).clamp_min(min_capacity)
    return max(min_capacity, math.ceil(factor * n_tokens * top_k / n_experts))


def capacity_keep_mask(expert_ids: torch.Tensor, n_experts: int, capacity: int | torch.Tensor) -> torch.Tensor:
    """(N, k) bool: which assignments fit into their expert's capacity (ids of n_experts, padding, fit nowhere
    that matters: the caller drops them).

    Priority (GShard): every token's first choice before any second choice, then token order. Vectorised:
    rank each assignment inside its expert after a stable sort, keep ranks < capacity.
    """
    n_tokens, top_k = expert_ids.shape
    choice_major = expert_ids.t().reshape(-1)  # all first choices, then all second choices, ...
    order = torch.argsort(choice_major, stable=True)
    counts = torch.bincount(choice_major, minlength=n_experts + 1)
    segment_start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(choice_major.numel(), device=expert_ids.device) - segment_start[choice_major[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return (rank < capacity).reshape(top_k, n_tokens).t()


def multiplicative_jitter(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Switch input jitter: multiply by U(1 - eps, 1 + eps)."""
    noise = torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    return x * noise
