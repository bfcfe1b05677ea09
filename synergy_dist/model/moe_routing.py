"""Token-choice top-k routing math for the MoE layer: scores, selection, capacity, losses, load statistics.

Everything here is a pure function of float32 tensors so it can be checked by hand in tests.
Notation: N routed tokens, E experts, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """The routing decision for N tokens."""

    expert_ids: torch.Tensor  # (N, k) long, chosen experts, best first
    gates: torch.Tensor  # (N, k) float32, combine weights of the chosen experts (sum to 1 per token)
    probs: torch.Tensor  # (N, E) float32, normalised router probabilities (used by the aux loss)


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


def expert_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) float64 number of (token, expert) assignments per expert."""
    return torch.bincount(expert_ids.reshape(-1), minlength=n_experts).to(torch.float64)


def switch_aux_loss(probs: torch.Tensor, counts: torch.Tensor, n_assignments: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (= 1 under perfect balance).

    f_i = counts_i / n_assignments is the dispatch fraction (not differentiable; the caller may pass counts summed
    over the whole global batch), P_i the mean router probability over the local tokens (differentiable).
    """
    n_experts = probs.shape[-1]
    fraction = (counts / n_assignments.clamp_min(1)).to(probs.dtype)
    mean_prob = probs.sum(dim=0) / max(probs.shape[0], 1)
    return n_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (0 when there are no tokens)."""
    return torch.logsumexp(logits, dim=-1).square().sum() / max(logits.shape[0], 1)


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float, min_capacity: int) -> int:
    """Assignments one expert accepts: ceil(factor * tokens * k / E), at least min_capacity."""
    return max(min_capacity, math.ceil(factor * n_tokens * top_k / n_experts))


def capacity_keep_mask(expert_ids: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """(N, k) bool: which assignments fit into their expert's capacity.

    Priority (GShard): every token's first choice before any second choice, then token order. Vectorised:
    rank each assignment inside its expert after a stable sort, keep ranks < capacity.
    """
    n_tokens, top_k = expert_ids.shape
    choice_major = expert_ids.t().reshape(-1)  # all first choices, then all second choices, ...
    order = torch.argsort(choice_major, stable=True)
    counts = torch.bincount(choice_major, minlength=n_experts)
    segment_start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(choice_major.numel(), device=expert_ids.device) - segment_start[choice_major[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return (rank < capacity).reshape(top_k, n_tokens).t()


def load_statistics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Router-health numbers from per-expert counts (see references B.10). All float32 scalars."""
    counts = counts.to(torch.float64)
    n_experts = counts.numel()
    total = counts.sum()
    if total <= 0:
        zero = torch.zeros((), dtype=torch.float32, device=counts.device)
        return {"load_entropy": zero, "load_entropy_normalized": zero, "max_over_mean_load": zero,
                "min_over_mean_load": zero, "dead_experts": zero}
    fraction = counts / total
    entropy = -(fraction * torch.log(fraction.clamp_min(1e-30))).sum()
    mean = total / n_experts
    return {
        "load_entropy": entropy.float(),
        "load_entropy_normalized": (entropy / math.log(n_experts)).float() if n_experts > 1 else entropy.float(),
        "max_over_mean_load": (counts.max() / mean).float(),
        "min_over_mean_load": (counts.min() / mean).float(),
        "dead_experts": (fraction < 0.1 / n_experts).sum().float(),
    }


def multiplicative_jitter(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Switch input jitter: multiply by U(1 - eps, 1 + eps)."""
    noise = torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    return x * noise


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits in float32, outside any autocast region."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())
