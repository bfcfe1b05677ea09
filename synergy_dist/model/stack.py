"""A network of layers: pre-norm residual blocks (attention or Mamba mixer, then a dense or MoE feed-forward).

Every mixer takes an optional cache, so a stack serves training (no cache) and generation alike, and an optional
document index `seq_idx` (B, T) that keeps packed documents apart (attention mask, Mamba state resets).
With Mixture-of-Depths (StackConfig.mod) some attention blocks process only the positions their router picks
(model/mod.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from synergy_dist.model.config import StackConfig, mlp_hidden
from synergy_dist.model.layers import Attention, AttentionCache, RMSNorm, SwiGLU
from synergy_dist.model.mamba import Mamba2
from synergy_dist.model.mod import DepthRouter, ModStats
from synergy_dist.model.moe.layer import MoEFeedForward
from synergy_dist.model.moe.statistics import MoEStats
from synergy_dist.model.precision import KeepsFloat32, compute_dtype


@dataclass
class LayerStats:
    """What the layers of a network report in one forward call, keyed by layer (index in a Stack, then a name)."""

    moe: dict = field(default_factory=dict)  # MoEStats of each MoE layer
    mod: dict = field(default_factory=dict)  # ModStats of each Mixture-of-Depths routed layer

    def named(self, prefix: str) -> LayerStats:
        return LayerStats({f"{prefix}{k}": v for k, v in self.moe.items()},
                          {f"{prefix}{k}": v for k, v in self.mod.items()})

    def update(self, other: LayerStats) -> None:
        self.moe.update(other.moe)
        self.mod.update(other.mod)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) when the layer has a feed-forward.
    A routed block (Mixture-of-Depths) adds both only at the positions its DepthRouter picks."""

    def __init__(self, letter: str, d_model: int, cfg: StackConfig, eps: float, use_moe: bool, routed: bool = False):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, eps)
        self.mixer = Attention(d_model, cfg, eps) if letter == "A" else Mamba2(d_model, cfg.mamba, eps)
        has_mlp = cfg.mlp_ratio > 0 and (letter == "A" or cfg.mlp_on_mamba)
        self.ffn_norm = RMSNorm(d_model, eps) if (has_mlp or use_moe) else None
        self.ffn: nn.Module | None = None
        if use_moe:
            dense_hidden = mlp_hidden(d_model, cfg.mlp_ratio) if cfg.mlp_ratio > 0 else cfg.moe.d_ff
            self.ffn = MoEFeedForward(d_model, dense_hidden, cfg.moe)
        elif has_mlp:
            self.ffn = SwiGLU(d_model, mlp_hidden(d_model, cfg.mlp_ratio))
        self.is_moe = use_moe
        self.depth_router = DepthRouter(d_model, cfg.mod) if routed else None

    def forward(self, x, valid=None, cache=None, seq_idx=None) -> tuple[torch.Tensor, MoEStats | None,
                                                                           ModStats | None]:
        if self.depth_router is not None:
            return self.depth_router(self._delta, x, valid, cache, seq_idx)
        # the mixer's cache must skip padding; without a cache padding is the caller's business
        x = x + self.mixer(self.mixer_norm(x), cache, seq_idx, valid if cache is not None else None)
        stats = None
        if self.ffn is not None:
            y, stats = self._ffn(x, valid)
            x = x + y
        return x, stats, None

    def _ffn(self, x, valid) -> tuple[torch.Tensor, MoEStats | None]:
        if self.is_moe:
            return self.ffn(self.ffn_norm(x), valid)
        return self.ffn(self.ffn_norm(x)), None

    def _delta(self, x, valid, cache, seq_idx) -> tuple[torch.Tensor, MoEStats | None]:
        """What the block adds to x (mixer + feed-forward), for a routed block's selected positions."""
        delta = self.mixer(self.mixer_norm(x), cache, seq_idx, valid if cache is not None else None)
        stats = None
        if self.ffn is not None:
            y, stats = self._ffn(x + delta, valid)
            delta = delta + y
        return delta, stats


class Stack(nn.Module):
    """A network of blocks following a layer pattern, ending with an RMSNorm (H-Net norm balance)."""

    def __init__(self, d_model: int, cfg: StackConfig, eps: float):
        super().__init__()
        moe_at, routed = set(cfg.moe_layer_indices()), set(cfg.mod_layer_indices())
        self.blocks = nn.ModuleList(
            Block(letter, d_model, cfg, eps, use_moe=i in moe_at, routed=i in routed)
            for i, letter in enumerate(cfg.layers)
        )
        self.final_norm = RMSNorm(d_model, eps)
        self.checkpoint_activations = False  # recompute dense blocks in backward (set by the trainer)

    def new_cache(self) -> list:
        return [AttentionCache() if isinstance(b.mixer, Attention) else b.mixer.new_cache() for b in self.blocks]

    def forward(self, x, valid=None, cache: list | None = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerStats]:
        """x (B, T, D), valid (B, T) bool or None, seq_idx (B, T) nondecreasing document index or None.
        Returns (y, LayerStats keyed by block index)."""
        layers = LayerStats()
        for i, block in enumerate(self.blocks):
            # MoE blocks are never recomputed: a second forward would repeat their all-to-alls and
            # count their expert load twice.
            if self.checkpoint_activations and self.training and cache is None and not block.is_moe:
                x, moe, mod = checkpoint(block, x, valid, None, seq_idx, use_reentrant=False)
            else:
                x, moe, mod = block(x, valid, None if cache is None else cache[i], seq_idx)
            if moe is not None:
                layers.moe[i] = moe
            if mod is not None:
                layers.mod[i] = mod
        return self.final_norm(x), layers


class Float32Stack(KeepsFloat32, Stack):
    """A Stack whose weights stay float32 and which computes in float32 under autocast (a stage's encoder with
    `encoder_fp32`: the boundary decisions above it then equal the float32 model's; model/precision.py)."""

    float32_recurse = True

    def __init__(self, d_model: int, cfg: StackConfig, eps: float, role: str):
        super().__init__(d_model, cfg, eps)
        self.float32_role = role

    def forward(self, x, valid=None, cache: list | None = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerStats]:
        self.require_float32()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(compute_dtype(x.dtype)), valid, cache, seq_idx)
