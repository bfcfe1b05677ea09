"""A network of layers: pre-norm residual blocks (attention or Mamba mixer, then a dense or MoE feed-forward).

Every mixer takes an optional cache, so a stack serves training (no cache) and generation alike, and an optional
document index `seq_idx` (B, T) that keeps packed documents apart (attention mask, Mamba state resets).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from synergy_dist.model.config import StackConfig, mlp_hidden
from synergy_dist.model.layers import Attention, AttentionCache, RMSNorm, SwiGLU
from synergy_dist.model.mamba import Mamba2
from synergy_dist.model.moe.layer import MoEFeedForward
from synergy_dist.model.moe.statistics import MoEStats
from synergy_dist.model.precision import KeepsFloat32, compute_dtype


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) when the layer has a feed-forward."""

    def __init__(self, letter: str, d_model: int, cfg: StackConfig, eps: float, use_moe: bool):
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

    def forward(self, x, valid=None, cache=None, seq_idx=None) -> tuple[torch.Tensor, MoEStats | None]:
        # the mixer's cache must skip padding; without a cache padding is the caller's business
        x = x + self.mixer(self.mixer_norm(x), cache, seq_idx, valid if cache is not None else None)
        stats = None
        if self.ffn is not None:
            if self.is_moe:
                y, stats = self.ffn(self.ffn_norm(x), valid)
            else:
                y = self.ffn(self.ffn_norm(x))
            x = x + y
        return x, stats


class Stack(nn.Module):
    """A network of blocks following a layer pattern, ending with an RMSNorm (H-Net norm balance)."""

    def __init__(self, d_model: int, cfg: StackConfig, eps: float):
        super().__init__()
        moe_at = set(cfg.moe_layer_indices())
        self.blocks = nn.ModuleList(
            Block(letter, d_model, cfg, eps, use_moe=i in moe_at) for i, letter in enumerate(cfg.layers)
        )
        self.final_norm = RMSNorm(d_model, eps)
        self.checkpoint_activations = False  # recompute dense blocks in backward (set by the trainer)

    def new_cache(self) -> list:
        return [AttentionCache() if isinstance(b.mixer, Attention) else b.mixer.new_cache() for b in self.blocks]

    def forward(self, x, valid=None, cache: list | None = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, MoEStats]]:
        """x (B, T, D), valid (B, T) bool or None, seq_idx (B, T) nondecreasing document index or None."""
        moe_stats: dict[int, MoEStats] = {}
        for i, block in enumerate(self.blocks):
            # MoE blocks are never recomputed: a second forward would repeat their all-to-alls and
            # count their expert load twice.
            if self.checkpoint_activations and self.training and cache is None and not block.is_moe:
                x, stats = checkpoint(block, x, valid, None, seq_idx, use_reentrant=False)
            else:
                x, stats = block(x, valid, None if cache is None else cache[i], seq_idx)
            if stats is not None:
                moe_stats[i] = stats
        return self.final_norm(x), moe_stats



class Float32Stack(KeepsFloat32, Stack):
    """A Stack whose weights stay float32 and which computes in float32 under autocast (a stage's encoder with
    `encoder_fp32`: the boundary decisions above it then equal the float32 model's; model/precision.py)."""

    float32_recurse = True

    def __init__(self, d_model: int, cfg: StackConfig, eps: float, role: str):
        super().__init__(d_model, cfg, eps)
        self.float32_role = role

    def forward(self, x, valid=None, cache: list | None = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, MoEStats]]:
        self.require_float32()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(compute_dtype(x.dtype)), valid, cache, seq_idx)
