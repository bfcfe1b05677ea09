"""Building blocks: RMSNorm, RoPE, causal attention with KV cache, SwiGLU, and a stack of layers.

Every mixer takes an optional cache. Without one it processes a whole sequence (training); with
one it processes the next T positions after those already cached (prefill and decode), so
training and generation run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from synergy_dist.model.config import StackConfig, mlp_hidden
from synergy_dist.model.moe import MoEFeedForward, MoEStats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form) for absolute positions given per call."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (B, H, T, hd) at positions start .. start+T-1."""
        t = torch.arange(start, start + x.shape[2], device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class AttentionCache:
    k: torch.Tensor | None = None  # (B, H, T_kept, hd)
    v: torch.Tensor | None = None
    seen: int = 0  # positions processed so far (RoPE offset)


class Attention(nn.Module):
    def __init__(self, d_model: int, cfg: StackConfig, eps: float):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or d_model // cfg.n_heads
        inner = self.n_heads * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, d_model, bias=False)
        self.out.is_residual_out = True
        self.window = cfg.sliding_window
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_base) if cfg.pos_encoding == "rope" else None
        self.q_norm = RMSNorm(self.head_dim, eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cache: AttentionCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).transpose(1, 3).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        start = cache.seen if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, start), self.rope(k, start)
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat((cache.k, k), dim=2), torch.cat((cache.v, v), dim=2)
            keep = k.shape[2] if self.window == 0 else min(k.shape[2], self.window)
            cache.k, cache.v, cache.seen = k[:, :, -keep:], v[:, :, -keep:], start + T
        mask, is_causal = self._mask(T, k.shape[2], start, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def _mask(self, t_q: int, t_k: int, start: int, device) -> tuple[torch.Tensor | None, bool]:
        """Query i sits at position start+i; the t_k keys end at position start+t_q-1."""
        window_matters = self.window > 0 and t_k > self.window
        if t_q == t_k and not window_matters:
            return None, True  # plain causal, fast kernel
        if t_q == 1 and not window_matters:
            return None, False  # one new query sees every cached key
        q_pos = torch.arange(start, start + t_q, device=device)[:, None]
        k_pos = torch.arange(start + t_q - t_k, start + t_q, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.window > 0:
            allowed &= k_pos > q_pos - self.window
        return allowed, False


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) when the layer has a feed-forward."""

    def __init__(self, letter: str, d_model: int, cfg: StackConfig, eps: float, use_moe: bool):
        super().__init__()
        from synergy_dist.model.mamba import Mamba2  # local import: mamba.py imports RMSNorm from here

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

    def forward(self, x, valid=None, cache=None) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.mixer(self.mixer_norm(x), cache)
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

    def forward(self, x, valid=None, cache: list | None = None) -> tuple[torch.Tensor, dict[int, MoEStats]]:
        moe_stats: dict[int, MoEStats] = {}
        for i, block in enumerate(self.blocks):
            # MoE blocks are never recomputed: a second forward would repeat their all-to-alls and
            # count their expert load twice.
            if self.checkpoint_activations and self.training and cache is None and not block.is_moe:
                x, stats = checkpoint(block, x, valid, None, use_reentrant=False)
            else:
                x, stats = block(x, valid, None if cache is None else cache[i])
            if stats is not None:
                moe_stats[i] = stats
        return self.final_norm(x), moe_stats


__all__ = ["RMSNorm", "RotaryEmbedding", "Attention", "AttentionCache", "SwiGLU", "Block", "Stack"]
