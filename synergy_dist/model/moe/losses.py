"""The auxiliary losses of an MoE layer: Switch load balancing and the ST-MoE router z-loss (both unweighted)."""

from __future__ import annotations

import torch


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
