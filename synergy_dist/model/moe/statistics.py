"""What an MoE layer reports per forward call, the expert-load statistics, and the one definition of a dead expert."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass
class MoEStats:
    """One MoE layer, one forward call. aux_loss and z_loss are unweighted; `loss` is what the model adds."""

    aux_loss: torch.Tensor  # Switch load-balancing loss, differentiable
    z_loss: torch.Tensor  # router z-loss, differentiable
    loss: torch.Tensor  # aux_loss_weight * aux_loss + z_loss_coef * z_loss of the layer's config, differentiable
    tokens_per_expert: torch.Tensor  # (n_experts,) float, counts over the global batch
    dropped_fraction: torch.Tensor  # scalar, fraction of (token, expert) assignments dropped by capacity
    load_entropy: torch.Tensor  # scalar, entropy of the load distribution (nats)
    max_over_mean_load: torch.Tensor  # scalar
    router_logit_rms: torch.Tensor  # scalar, magnitude of the router logits

    def detach(self) -> MoEStats:
        return MoEStats(**{f.name: getattr(self, f.name).detach() for f in fields(self)})


def expert_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) float64 number of (token, expert) assignments per expert; ids of n_experts (padding) are not counted."""
    return torch.bincount(expert_ids.reshape(-1), minlength=n_experts + 1)[:n_experts].to(torch.float64)


@dataclass
class LoadStatistics:
    load_entropy: torch.Tensor  # float32 scalar, entropy of the load shares (nats); 0 without load
    max_over_mean_load: torch.Tensor  # float32 scalar, busiest expert's load / mean load; 0 without load


def load_statistics(counts: torch.Tensor) -> LoadStatistics:
    """Router-health numbers from per-expert counts (see references B.10)."""
    counts = counts.to(torch.float64)
    # no load gives 0 for both through the clamp, without a branch on the tensor (a host synchronisation per layer)
    total = counts.sum().clamp_min(1e-30)
    fraction = counts / total
    entropy = -(fraction * torch.log(fraction.clamp_min(1e-30))).sum()
    return LoadStatistics(entropy.float(), (counts.max() / (total / counts.numel())).float())


def dead_experts(loads: torch.Tensor | list[float], fraction: float) -> list[int]:
    """Experts whose load is below `fraction` x the mean load (none when nothing was routed)."""
    loads = [float(x) for x in loads]
    total = sum(loads)
    if not loads or total <= 0:
        return []
    mean = total / len(loads)
    return [i for i, x in enumerate(loads) if x < fraction * mean]


def load_entropy_ratio(loads: torch.Tensor | list[float]) -> float:
    """Entropy of the load shares over its maximum log(E): 1 = uniform, 0 = one expert takes everything."""
    loads = [float(x) for x in loads]
    total = sum(loads)
    if len(loads) < 2 or total <= 0:
        return 1.0
    shares = [x / total for x in loads if x > 0]
    return -sum(p * math.log(p) for p in shares) / math.log(len(loads))
