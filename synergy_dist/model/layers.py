"""Building blocks: RMSNorm, RoPE, causal attention with KV cache, SwiGLU.

Attention takes an optional cache. Without one it processes a whole sequence (training); with
one it processes the next T positions after those already cached (prefill and decode), so
training and generation run the same code. With a document index `seq_idx` (packed documents) the
mask is block-diagonal causal: a position attends only to earlier positions of its own document.

A batch of generated rows may differ in length: a cached call takes `valid` (B, T), each row's real positions
as a prefix (right padding). The cache then keeps each row's keys left-aligned with its own length and RoPE
offset, pads are never cached (their slots are overwritten by the row's next keys), and an explicit mask limits
each query to its row's earlier keys. Rows of equal length without padding take the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synergy_dist.model.config import StackConfig

# Query rows per SDPA call for a whole sequence of several documents (see Attention._blockwise).
DOCUMENT_BLOCK = 128


def skips_earlier_documents(device: torch.device) -> bool:
    """Whether blockwise attention also leaves out the keys before each block's earliest document start. Only
    on CPU: finding those starts reads the document index on the host, free on CPU but a synchronisation per
    layer on an accelerator (the host would wait for the device); on CPU it pays (isolation cost 1.09x vs 0.90x
    the unisolated bytes/s, docs/BENCHMARKS.md), as SDPA's masked CPU kernel computes every key block it gets."""
    return device.type == "cpu"


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

    def forward(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, hd) at positions start .. start+T-1, or at positions `start` (B, T), one row each."""
        if isinstance(start, torch.Tensor):
            freqs = (start.to(torch.float32)[..., None] * self.inv_freq)[:, None]  # (B, 1, T, hd / 2)
        else:
            t = torch.arange(start, start + x.shape[2], device=x.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class AttentionCache:
    k: torch.Tensor | None = None  # (B, H, T_kept, hd); slot j of a row holds its key at position `offset + j`
    v: torch.Tensor | None = None
    seen: int = 0  # positions processed so far (RoPE offset) while every row has the same length
    doc: torch.Tensor | None = None  # (B, T_kept) document index of the kept keys (with seq_idx)
    lengths: torch.Tensor | None = None  # (B,) positions processed per row, once rows differ in length
    offset: int = 0  # position of slot 0 (earlier keys fell out of the sliding window)

    def take(self, rows: torch.Tensor) -> AttentionCache:
        """The cache of some rows (a ragged cache: per-row lengths)."""
        lengths = self.lengths if self.lengths is not None else torch.full((self.k.shape[0],), self.seen,
                                                                           device=self.k.device)
        return AttentionCache(self.k[rows], self.v[rows], self.seen, None if self.doc is None else self.doc[rows],
                              lengths[rows], self.offset)

    def put(self, rows: torch.Tensor, part: AttentionCache) -> None:
        """Write back the cache of those rows after a call on them alone: both go to a common slot frame (from
        the smaller offset to the larger end; slots a side did not keep are zeros that no query of its rows sees)."""
        lengths = self.lengths if self.lengths is not None else torch.full((self.k.shape[0],), self.seen,
                                                                           device=self.k.device)
        start = min(self.offset, part.offset)
        end = max(self.offset + self.k.shape[2], part.offset + part.k.shape[2])

        def frame(t: torch.Tensor, offset: int, dim: int) -> torch.Tensor:
            pad = [0, 0] * (t.dim() - 1 - dim) + [offset - start, end - offset - t.shape[dim]]
            return F.pad(t, pad)

        self.k = frame(self.k, self.offset, 2).index_put((rows,), frame(part.k, part.offset, 2))
        self.v = frame(self.v, self.offset, 2).index_put((rows,), frame(part.v, part.offset, 2))
        if self.doc is not None:
            self.doc = frame(self.doc, self.offset, 1).index_put((rows,), frame(part.doc, part.offset, 1))
        self.lengths, self.offset = lengths.index_put((rows,), part.lengths), start


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

    def forward(self, x: torch.Tensor, cache: AttentionCache | None = None,
                seq_idx: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); seq_idx (B, T) nondecreasing document index (continuing the cache's), None = one sequence;
        valid (B, T) bool, with a cache only: each row's real positions, a prefix of the row (None = all)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).transpose(1, 3).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None and (cache.lengths is not None or (valid is not None and not bool(valid.all()))):
            y = self._ragged(q, k, v, cache, seq_idx, valid)
            return self.out(y.transpose(1, 2).reshape(B, T, -1))
        start = cache.seen if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, start), self.rope(k, start)
        k_doc = seq_idx
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat((cache.k, k), dim=2), torch.cat((cache.v, v), dim=2)
                if seq_idx is not None and cache.doc is not None:
                    k_doc = torch.cat((cache.doc, seq_idx), dim=1)
            keep = k.shape[2] if self.window == 0 else min(k.shape[2], self.window)
            cache.k, cache.v, cache.seen = k[:, :, -keep:], v[:, :, -keep:], start + T
            cache.offset = cache.seen - keep
            cache.doc = None if k_doc is None else k_doc[:, -keep:]
        mask, is_causal = self._mask(T, k.shape[2], start, x.device)
        if seq_idx is not None and k_doc is not None and k_doc.shape[1] == k.shape[2]:
            mask = self._document_mask(mask, is_causal, seq_idx, k_doc)
            is_causal = False
            if T == k.shape[2] and T > DOCUMENT_BLOCK:
                y = self._blockwise(q, k, v, mask, seq_idx)
                return self.out(y.transpose(1, 2).reshape(B, T, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def _ragged(self, q, k, v, cache: AttentionCache, seq_idx: torch.Tensor | None,
                valid: torch.Tensor | None) -> torch.Tensor:
        """A cached call for rows of different lengths (see the module docstring); returns (B, H, T, hd)."""
        B, H, T, hd = q.shape
        lengths = cache.lengths if cache.lengths is not None else torch.full((B,), cache.seen, device=q.device)
        positions = lengths[:, None] + torch.arange(T, device=q.device)  # (B, T); pads run past the row's end
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        # each row writes its T new keys from its first free slot; its pads land after its real keys
        slots = (positions - cache.offset)[:, None, :, None].expand(B, H, T, hd)
        old_k = cache.k if cache.k is not None else k.new_zeros(B, H, 0, hd)
        keys = torch.cat((old_k, k.new_zeros(B, H, T, hd)), dim=2).scatter(2, slots, k)
        old_v = cache.v if cache.v is not None else v.new_zeros(B, H, 0, hd)
        values = torch.cat((old_v, v.new_zeros(B, H, T, hd)), dim=2).scatter(2, slots, v)
        docs = None
        if seq_idx is not None:
            old_doc = cache.doc if cache.doc is not None else seq_idx.new_zeros(B, 0)
            docs = torch.cat((old_doc, seq_idx.new_zeros(B, T)), dim=1).scatter(1, slots[:, 0, :, 0], seq_idx)
        new_lengths = lengths + (T if valid is None else valid.sum(dim=1))

        # a query sees its row's keys up to its own position: real ones only, as a row's pads come after its real
        # positions; a pad query sees every slot (its output is never used, but stays finite)
        k_pos = cache.offset + torch.arange(keys.shape[2], device=q.device)
        mask = k_pos[None, None, :] <= positions[..., None]  # (B, T, slots)
        if self.window > 0:
            mask &= k_pos[None, None, :] > positions[..., None] - self.window
        if docs is not None:
            mask &= docs[:, None, :] == seq_idx[..., None]
        if valid is not None:
            mask |= ~valid[..., None]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])

        # keep the slots up to the longest row (the pads' slots past it go; a shorter row's are overwritten later)
        # and, with a sliding window, drop the slots that no row can see again
        used = int(new_lengths.max()) - cache.offset
        drop = 0 if self.window == 0 else max(0, int(new_lengths.min()) - self.window - cache.offset)
        cache.k, cache.v = keys[:, :, drop:used], values[:, :, drop:used]
        cache.doc = None if docs is None else docs[:, drop:used]
        cache.offset += drop
        cache.lengths = new_lengths
        return y

    @torch.compiler.disable  # its loop and slices follow the length (and the documents): eager, not a graph per T
    def _blockwise(self, q, k, v, mask: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
        """SDPA with a boolean mask by blocks of DOCUMENT_BLOCK queries, each against the keys up to its last
        query, from its window start and, where `skips_earlier_documents`, from the earliest document start of
        its rows: with a mask the kernels compute every key block (no causal skipping, about twice the work of
        the causal kernel), so the keys no query of a block may see are left out. Same result as one call
        with the whole mask."""
        T = q.shape[2]
        starts = range(0, T, DOCUMENT_BLOCK)
        firsts = [0] * len(starts)
        if skips_earlier_documents(q.device):
            idx = torch.arange(T, device=q.device).expand_as(doc)
            opens = torch.ones_like(doc, dtype=torch.bool)
            opens[:, 1:] = doc[:, 1:] != doc[:, :-1]
            doc_start = torch.where(opens, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T), nondecreasing
            firsts = doc_start[:, ::DOCUMENT_BLOCK].min(dim=0).values.tolist()  # a block's first query starts earliest
        outs = []
        for first, s in zip(firsts, starts):
            e = min(s + DOCUMENT_BLOCK, T)
            k0 = max(first, s - self.window + 1) if self.window > 0 else first
            outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, k0:e], v[:, :, k0:e],
                                                       attn_mask=mask[..., s:e, k0:e]))
        return torch.cat(outs, dim=2)

    @staticmethod
    def _document_mask(mask: torch.Tensor | None, is_causal: bool, q_doc: torch.Tensor,
                       k_doc: torch.Tensor) -> torch.Tensor:
        """(B, 1, t_q, t_k) boolean mask: the position mask (causal, window) and the same document."""
        same = (q_doc[:, :, None] == k_doc[:, None, :])[:, None]
        if is_causal:
            t_q, t_k = q_doc.shape[1], k_doc.shape[1]
            mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q_doc.device).tril(t_k - t_q)
        return same if mask is None else same & mask

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


__all__ = ["RMSNorm", "RotaryEmbedding", "Attention", "AttentionCache", "SwiGLU"]
