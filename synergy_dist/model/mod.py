"""Mixture-of-Depths (Raposo et al. 2024): a routed block processes only some positions, the others skip it.

Each routed block has a router, a scalar weight r_i = w . x_i per position. In training (top-k mode, expert
choice) the top k = ceil(capacity x valid positions) of each row go through the block, padding never; the block's
output delta for them is multiplied by sigmoid(r_i) (the router's gradient path; a monotone map of r_i, so the
same top-k, but a weight in (0, 1) that starts at 1/2 instead of near 0), and the other positions take the
residual path unchanged. The selected positions keep their order and their document index: a selected position
attends only to earlier selected positions of its own document.

Top-k over a row is not causal (a position's selection depends on later positions). A small causal predictor,
an MLP on a stop-gradient of the block input trained with BCE to say "this position is in the top-k", decides
instead in predictor mode (eval, generation, or training with `predictor_in_training`): position i is processed
when predictor(x_i) > 0 (probability > 0.5). That depends on position i alone, so cached generation equals full
recomputation, and a position that skips a block never enters that block's attention cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from synergy_dist.model.config import ModConfig
from synergy_dist.model.moe.statistics import MoEStats
from synergy_dist.model.precision import Float32Linear


@dataclass
class ModStats:
    """One routed block, one forward call. predictor_loss is unweighted; `loss` is what the model adds."""

    loss: torch.Tensor  # predictor_loss_coef * predictor_loss, differentiable (reaches the predictor only)
    predictor_loss: torch.Tensor  # BCE of the predictor against the top-k selection, per valid position
    processed_fraction: torch.Tensor  # positions that went through the block / valid positions
    predictor_accuracy: torch.Tensor  # fraction of valid positions where the predictor agrees with the top-k

    def detach(self) -> ModStats:
        return ModStats(**{f.name: getattr(self, f.name).detach() for f in fields(self)})


def capacity_count(n_valid: torch.Tensor, capacity: float) -> torch.Tensor:
    """k = ceil(capacity x n_valid) per row (the small margin keeps 0.1 x 30 at 3 despite float rounding)."""
    return torch.ceil(n_valid.double() * capacity - 1e-9).clamp(min=0).long()


def top_k_width(length: int, capacity: float) -> int:
    """The most positions top-k selects in a row of `length` (a row full of valid positions): known from the
    shape, so training never waits for the device to learn how many positions to process."""
    return max(0, math.ceil(length * capacity - 1e-9))  # capacity_count's arithmetic, on the host


def top_k_positions(scores: torch.Tensor, valid: torch.Tensor, capacity: float) -> torch.Tensor:
    """(B, T) bool: the ceil(capacity x valid) highest-scoring valid positions of each row."""
    k = capacity_count(valid.sum(dim=1), capacity)
    k_max = top_k_width(valid.shape[1], capacity)
    chosen = torch.zeros_like(valid)
    if k_max == 0:
        return chosen
    top = scores.masked_fill(~valid, float("-inf")).topk(k_max, dim=1).indices  # a row's first k are valid ones
    return chosen.scatter(1, top, torch.arange(k_max, device=valid.device)[None, :] < k[:, None])


def compact(selected: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's selected positions first, in order: (index (B, K), kept (B, K) bool, a prefix per row). K =
    `width` (at least the most selected in a row), or None for that most (a host synchronisation); the slots past a
    row's count are padding."""
    counts = selected.sum(dim=1)
    width = int(counts.max()) if width is None else width
    order = torch.sort((~selected).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    kept = torch.arange(order.shape[1], device=selected.device)[None, :] < counts[:, None]
    return order, kept


# (x, valid, cache, seq_idx) -> (block delta, MoE stats or None): the routed block's sublayers
BlockDelta = Callable[..., tuple[torch.Tensor, MoEStats | None]]


class DepthRouter(nn.Module):
    """The router and causal predictor of one routed block; `forward` runs the block on the positions it picks."""

    def __init__(self, d_model: int, cfg: ModConfig):
        super().__init__()
        self.cfg = cfg
        # float32 like the boundary and expert routers (model/precision.py): under bf16 autocast the top-k and
        # the predictor's threshold would otherwise depend on bf16 rounding, which differs between a full
        # forward and cached generation
        self.router = Float32Linear(d_model, 1, bias=False, role="Mixture-of-Depths router")
        hidden = cfg.predictor_hidden or max(1, d_model // 4)
        self.predictor = nn.Sequential(Float32Linear(d_model, hidden, bias=True, role="Mixture-of-Depths predictor"),
                                       nn.SiLU(),
                                       Float32Linear(hidden, 1, bias=True, role="Mixture-of-Depths predictor"))

    def forward(self, block: BlockDelta, x: torch.Tensor, valid: torch.Tensor | None, cache,
                seq_idx: torch.Tensor | None) -> tuple[torch.Tensor, MoEStats | None, ModStats]:
        """x (B, T, D) -> (x + sigmoid(r) x block delta at the processed positions, MoE stats, ModStats)."""
        B, T, D = x.shape
        valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        scores = self.router(x).squeeze(-1)  # float32 (float64 in fp64 runs)
        predicted = self.predictor(x.detach()).squeeze(-1)
        top_k = top_k_positions(scores, valid, self.cfg.capacity)
        use_top_k = self.training and cache is None and not self.cfg.predictor_in_training
        selected = top_k if use_top_k else (predicted > 0) & valid

        # top-k: as many slots as a full row selects (no host synchronisation). Without a cache >= 1 slot (maybe
        # padding), so that every rank enters an MoE layer's collectives equally often; generation skips the block
        # when no position of the call goes through it.
        width = top_k_width(T, self.cfg.capacity) if use_top_k else None
        index, kept = compact(selected, width)
        if cache is None and index.shape[1] == 0:
            index, kept = compact(selected, 1)
        moe = None
        if index.shape[1] > 0:
            part = x.gather(1, index[..., None].expand(-1, -1, D))
            part_doc = None if seq_idx is None else seq_idx.gather(1, index).cummax(dim=1).values  # pads: last doc
            delta, moe = block(part, kept, cache, part_doc)
            weight = torch.sigmoid(scores).gather(1, index) * kept  # padding slots add nothing
            x = x.scatter_add(1, index[..., None].expand(-1, -1, D), delta * weight[..., None].to(delta.dtype))

        n_valid = valid.sum().clamp(min=1)
        bce = F.binary_cross_entropy_with_logits(predicted, top_k.to(predicted.dtype), reduction="none")
        predictor_loss = (bce * valid).sum() / n_valid
        stats = ModStats(
            loss=self.cfg.predictor_loss_coef * predictor_loss,
            predictor_loss=predictor_loss,
            processed_fraction=(selected.sum() / n_valid).float(),
            predictor_accuracy=((((predicted > 0) == top_k) & valid).sum() / n_valid).float(),
        )
        return x, moe, stats


__all__ = ["ModStats", "DepthRouter", "capacity_count", "top_k_width", "top_k_positions", "compact"]
