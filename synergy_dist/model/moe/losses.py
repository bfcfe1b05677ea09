"""The auxiliary losses of an MoE layer (all unweighted): Switch load balancing over the batch, DeepSeek-V3's
sequence-wise balance loss, and the ST-MoE router z-loss."""

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


def sequence_balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, sequence_of: torch.Tensor,
                          n_sequences: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv:2412.19437, Eq. 17-20), averaged over the
    sequences that hold tokens: per sequence s of T_s tokens, sum_i f_i * P_i with f_i = E / (K * T_s) * (tokens
    of s sent to expert i) and P_i = the mean over s of the normalised affinity probs[:, i]. 1 when every
    sequence is balanced on its own (a batch can be balanced while its sequences are not).

    probs: (N, E) differentiable; expert_ids: (N, K) chosen experts; sequence_of: (N,) sequence of each token.
    """
    n_tokens, n_experts = probs.shape
    if n_tokens == 0:
        return probs.sum() * 0.0  # keeps the graph (and the gradient collectives) of an empty rank
    top_k = expert_ids.shape[1]
    counts = torch.zeros(n_sequences, n_experts, dtype=probs.dtype, device=probs.device)
    counts.index_put_((sequence_of[:, None].expand_as(expert_ids), expert_ids),
                      torch.ones_like(expert_ids, dtype=probs.dtype), accumulate=True)
    prob_sums = torch.zeros(n_sequences, n_experts, dtype=probs.dtype, device=probs.device)
    prob_sums = prob_sums.index_add(0, sequence_of, probs)
    tokens = torch.bincount(sequence_of, minlength=n_sequences).to(probs.dtype)
    present = tokens > 0
    per_token = tokens[present, None]
    fraction = counts[present] * n_experts / (top_k * per_token)
    mean_prob = prob_sums[present] / per_token
    return (fraction * mean_prob).sum(dim=1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (0 when there are no tokens)."""
    return torch.logsumexp(logits, dim=-1).square().sum() / max(logits.shape[0], 1)
