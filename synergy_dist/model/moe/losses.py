"""The auxiliary losses of an MoE layer (all unweighted): Switch load balancing over the batch, DeepSeek-V3's
sequence-wise balance loss, and the ST-MoE router z-loss."""

from __future__ import annotations

import torch


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 of `values`, counting row i weight[i] times (0/1 for padding); 0 rows give 0."""
    if weight is None:
        return values.sum(dim=0) / max(values.shape[0], 1)
    weight = weight.to(values.dtype)
    weight = weight.reshape(-1, *([1] * (values.dim() - 1)))
    return (values * weight).sum(dim=0) / weight.sum().clamp_min(1)


def switch_aux_loss(probs: torch.Tensor, counts: torch.Tensor, n_assignments: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (= 1 under perfect balance).

    f_i = counts_i / n_assignments is the dispatch fraction (not differentiable; the caller may pass counts summed
    over the whole global batch), P_i the mean router probability over the local tokens (differentiable; `weight`
    (N,) 0/1 leaves padding tokens out).
    """
    n_experts = probs.shape[-1]
    fraction = (counts / n_assignments.clamp_min(1)).to(probs.dtype)
    return n_experts * (fraction * _weighted_mean(probs, weight)).sum()


def sequence_balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, sequence_of: torch.Tensor,
                          n_sequences: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv:2412.19437, Eq. 17-20), averaged over the
    sequences that hold tokens: per sequence s of T_s tokens, sum_i f_i * P_i with f_i = E / (K * T_s) * (tokens
    of s sent to expert i) and P_i = the mean over s of the normalised affinity probs[:, i]. 1 when every
    sequence is balanced on its own (a batch can be balanced while its sequences are not).

    probs: (N, E) differentiable; expert_ids: (N, K) chosen experts; sequence_of: (N,) sequence of each token;
    weight: (N,) 0/1, 0 for padding tokens (left out), or None. No boolean indexing: it would synchronise.
    """
    n_tokens, n_experts = probs.shape
    if n_tokens == 0:
        return probs.sum() * 0.0  # keeps the graph (and the gradient collectives) of an empty rank
    top_k = expert_ids.shape[1]
    w = probs.new_ones(n_tokens) if weight is None else weight.to(probs.dtype)
    counts = torch.zeros(n_sequences, n_experts, dtype=probs.dtype, device=probs.device)
    counts.index_put_((sequence_of[:, None].expand_as(expert_ids), expert_ids),
                      w[:, None].expand_as(expert_ids).contiguous(), accumulate=True)
    prob_sums = torch.zeros(n_sequences, n_experts, dtype=probs.dtype, device=probs.device)
    prob_sums = prob_sums.index_add(0, sequence_of, probs * w[:, None])
    tokens = torch.zeros(n_sequences, dtype=probs.dtype, device=probs.device).index_add(0, sequence_of, w)
    present = (tokens > 0).to(probs.dtype)
    per_token = tokens.clamp_min(1)[:, None]
    per_sequence = (counts * n_experts / (top_k * per_token) * (prob_sums / per_token)).sum(dim=1)
    return (per_sequence * present).sum() / present.sum().clamp_min(1)


def router_z_loss(logits: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (0 when there are no tokens; `weight` (N,) 0/1
    leaves padding tokens out)."""
    return _weighted_mean(torch.logsumexp(logits, dim=-1).square(), weight)
