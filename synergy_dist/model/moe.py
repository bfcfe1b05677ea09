"""Mixture-of-Experts feed-forward layer (contract; the implementation replaces this file)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MoEConfig:
    n_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts each token is sent to (Mixtral: 2 of 8)
    d_ff: int = 0  # hidden width of one SwiGLU expert; 0 = same as the dense MLP of the part
    shared_expert: bool = False  # one always-on dense expert added to the routed output
    scoring: str = "softmax"  # "softmax" (softmax over the top-k logits, Mixtral) | "sigmoid_bias" (aux-loss-free, DeepSeek-V3)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight (0 disables)
    z_loss_coef: float = 1e-3  # router z-loss weight (ST-MoE)
    jitter: float = 0.0  # multiplicative jitter noise on router inputs during training (0 = off)
    dropless: bool = True  # route every token (no capacity); False = capacity factor with token dropping
    capacity_factor_train: float = 1.25  # capacity per expert = factor * tokens * top_k / n_experts (when not dropless)
    capacity_factor_eval: float = 2.0
    bias_update_rate: float = 1e-3  # step of the per-expert selection bias for sigmoid_bias scoring
    expert_parallel_size: int = 1  # experts are split across this many ranks (set from the training config)


@dataclass
class MoEStats:
    """What one MoE layer reports for one forward call (losses unweighted; the model applies coefficients)."""

    aux_loss: torch.Tensor  # Switch load-balancing loss, differentiable
    z_loss: torch.Tensor  # router z-loss, differentiable
    tokens_per_expert: torch.Tensor  # (n_experts,) float, counts over the global batch
    dropped_fraction: torch.Tensor  # scalar, fraction of (token, expert) assignments dropped by capacity
    load_entropy: torch.Tensor  # scalar, entropy of the load distribution (nats)
    max_over_mean_load: torch.Tensor  # scalar
    router_logit_rms: torch.Tensor  # scalar, magnitude of the router logits
    extra: dict = field(default_factory=dict)


class MoEFeedForward(nn.Module):
    """x: (B, T, D) concept states, valid: (B, T) bool mask of real (non-padding) tokens or None.

    forward returns (y of shape (B, T, D), MoEStats). Padding tokens are not routed and get y = 0.
    """

    def __init__(self, d_model: int, d_ff_dense: int, cfg: MoEConfig):
        super().__init__()
        raise NotImplementedError("MoEFeedForward is being implemented")

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None):  # -> tuple[Tensor, MoEStats]
        raise NotImplementedError
