"""Dynamic chunking: boundary routers, downsampling, EMA smoothing, causal upsampling, ratio loss.

Notation follows H-Net (arXiv 2507.07955, Sec. 2.2):
  p_t   boundary probability of unit t (causal: uses units <= t)
  b_t   = [p_t >= 0.5]; forced to 1 at the first unit of a sequence and of every document (with document
        isolation also at the EOD that opens a document, so no concept spans two documents)
  P_k   p of the k-th selected unit (the confidence of concept k)
  smoothing  z_bar_k = P_k z_k + (1 - P_k) z_bar_{k-1}
  upsample   y_t = STE(c_t) * z_bar_{#boundaries <= t},  c_t = p_t if b_t else 1 - p_t,
             STE(c) = c + stopgrad(1 - c): forward value 1, gradient reaches the router.
Everything is vectorised over positions (cumsum / scatter / gather, chunked scan for the EMA).

Cached calls (generation) may carry padding at the end of a row (right padding: a row's valid units are a prefix
of the call, possibly empty); what a router remembers is taken at each row's last valid unit (`last_valid`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.vocab import EOD_ID, N_BYTES, PAD_ID
from synergy_dist.model.config import LEARNED_ROUTER_KINDS, RouterConfig
from synergy_dist.model.precision import Float32Linear, compute_dtype
from synergy_dist.model.ssd import ssd_scan


def _space_like_table(vocab_size: int) -> torch.Tensor:
    """True for ASCII bytes that are not letters or digits (whitespace, punctuation) and for specials."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    for byte in range(128):
        table[byte] = not chr(byte).isalnum()
    table[N_BYTES:] = True
    return table


@dataclass
class RouterState:
    """What a router must remember between incremental calls."""

    last_input: torch.Tensor | None = None  # (B, 1, D) previous unit state (cosine router)
    last_id: torch.Tensor | None = None  # (B,) previous byte id (space router)
    doc_pos: torch.Tensor | None = None  # (B,) position of the previous unit inside its document (stride router)


@dataclass
class RoutingOutput:
    prob: torch.Tensor  # (B, T) boundary probability p_t (1 where forced)
    boundary: torch.Tensor  # (B, T) bool b_t (False on invalid positions)
    ratio_loss: torch.Tensor  # scalar, H-Net Eq. 10 (1.0 at the target; can dip below 1)
    boundary_rate: torch.Tensor  # scalar, boundaries / valid units (detached)
    valid: torch.Tensor  # (B, T) bool, the real (non-padding) units the router was given


class BoundaryRouter(nn.Module):
    def __init__(self, d_model: int, cfg: RouterConfig, vocab_size: int = PAD_ID + 1):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        if cfg.kind == "cosine":
            # projections start at the identity: p_t = (1 - cos(x_t, x_{t-1})) / 2 at init
            self.q_proj = Float32Linear(d_model, d_model, bias=False, role="boundary router q_proj")
            self.k_proj = Float32Linear(d_model, d_model, bias=False, role="boundary router k_proj")
            for proj in (self.q_proj, self.k_proj):
                nn.init.eye_(proj.weight)
                proj.keep_init = True
        elif cfg.kind == "gate":
            # score ~ N(0, 1) for unit-RMS inputs; the bias puts P(score > 0) at 1/N from the start
            self.score = Float32Linear(d_model, 1, bias=True, role="boundary router score")
            nn.init.normal_(self.score.weight, std=d_model**-0.5)
            target = torch.tensor(1.0 - 1.0 / cfg.target_bytes_per_concept)
            nn.init.constant_(self.score.bias, -torch.distributions.Normal(0.0, 1.0).icdf(target).item())
            self.score.keep_init = True
        elif cfg.kind == "space":
            self.register_buffer("space_like", _space_like_table(vocab_size), persistent=False)
        if self.learned and cfg.warmup_steps > 0:
            # w, the fixed stride's share of p during the warm-up: set before every step by set_router_warmup
            # (not saved: a resumed run sets it from its step; 0, the learned router alone, when never set)
            self.register_buffer("stride_share", torch.zeros(()), persistent=False)
            self.warmup_stride = max(1, round(cfg.target_bytes_per_concept))

    @property
    def learned(self) -> bool:
        return self.kind in LEARNED_ROUTER_KINDS

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D) encoder output
        ids: torch.Tensor | None,  # (B, T) byte ids (stage 0 only)
        force: torch.Tensor,  # (B, T) bool: units that must start a concept (sequence / document starts)
        valid: torch.Tensor,  # (B, T) bool: real units (not padding)
        state: RouterState | None = None,
    ) -> RoutingOutput:
        if self.kind == "cosine":
            prev = x.new_zeros(x[:, :1].shape) if state is None or state.last_input is None else state.last_input
            q = self.q_proj(x)
            k = self.k_proj(torch.cat((prev, x[:, :-1]), dim=1))
            dtype = compute_dtype(q.dtype)  # float32 (float64 for a float64 model)
            prob = (0.5 * (1.0 - F.cosine_similarity(q.to(dtype), k.to(dtype), dim=-1, eps=1e-6))).clamp(0.0, 1.0)
            if state is not None:
                old = None if state.last_input is None else state.last_input[:, 0]
                state.last_input = last_valid(x, valid, old)[:, None]
        elif self.kind == "gate":
            prob = torch.sigmoid(self.score(x).squeeze(-1).to(compute_dtype(x.dtype)))
        elif self.kind == "stride":
            prob = (self._doc_positions(force, valid, state) % self.cfg.stride == 0).float()
        else:  # space: a concept starts at a word byte that follows a space-like byte
            if ids is None:
                raise ValueError("the 'space' router needs byte ids; it only works at stage 0")
            if state is None or state.last_id is None:
                first = torch.full_like(ids[:, :1], EOD_ID)
            else:
                first = state.last_id[:, None]
            prev_ids = torch.cat((first, ids[:, :-1]), dim=1)
            prob = (self.space_like[prev_ids] & ~self.space_like[ids]).float()
            if state is not None:
                state.last_id = last_valid(ids, valid, state.last_id)
        learned = prob = torch.where(force, torch.ones_like(prob), prob)
        if self.learned and self.cfg.warmup_steps > 0:  # blend a stride into p; share 0: exactly the learned p
            stride = (self._doc_positions(force, valid, state) % self.warmup_stride == 0).to(prob.dtype)
            share = self.stride_share.to(prob.dtype)
            prob = torch.where(force, torch.ones_like(prob), share * stride + (1 - share) * learned)
        boundary = (prob >= 0.5) & valid
        n_valid = valid.sum().clamp(min=1)
        rate = boundary.sum() / n_valid
        # the ratio loss trains the learned router on its own decisions, whatever a warm-up's stride share
        learned_rate = rate if learned is prob else ((learned >= 0.5) & valid).sum() / n_valid
        loss = ratio_loss(learned_rate.detach(), (learned * valid).sum() / n_valid, self.cfg.target_bytes_per_concept)
        return RoutingOutput(
            prob=prob,
            boundary=boundary,
            ratio_loss=loss,
            boundary_rate=rate.detach(),
            valid=valid,
        )

    def _doc_positions(self, force: torch.Tensor, valid: torch.Tensor, state: RouterState | None) -> torch.Tensor:
        """Index of each unit inside its document, continuing from the state across calls."""
        B, T = force.shape
        idx = torch.arange(T, device=force.device).expand(B, T)
        last_start = torch.where(force, idx, torch.full_like(idx, -1)).cummax(dim=1).values
        carried = -1 if state is None or state.doc_pos is None else state.doc_pos[:, None]
        pos = torch.where(last_start >= 0, idx - last_start, idx + 1 + carried)
        if state is not None:
            state.doc_pos = last_valid(pos, valid, state.doc_pos)
        return pos


def set_router_warmup(model: nn.Module, step: int) -> None:
    """Before optimizer step `step` (0-based; the trainer and the benchmark loop call it): each warming-up
    router's stride share w = max(0, 1 - step / warmup_steps)."""
    for module in model.modules():
        if isinstance(module, BoundaryRouter) and hasattr(module, "stride_share"):
            module.stride_share.fill_(max(0.0, 1.0 - step / module.cfg.warmup_steps))


def last_valid(values: torch.Tensor, valid: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
    """values (B, T, ...) at each row's last valid position, for rows whose valid positions are a prefix (right
    padding); `old` (B, ...) for a row without any (None: that row's first value). All valid: values[:, -1]."""
    if bool(valid[:, -1].all()):
        return values[:, -1]
    count = valid.sum(dim=1)
    picked = values[torch.arange(values.shape[0], device=values.device), (count - 1).clamp(min=0)]
    if old is None:
        return picked
    has_one = (count > 0).view(-1, *[1] * (picked.dim() - 1))
    return torch.where(has_one, picked, old.to(picked.dtype))


def ratio_loss(rate: torch.Tensor, mean_prob: torch.Tensor, target: float) -> torch.Tensor:
    """H-Net Eq. 10: N/(N-1) * ((N-1) F G + (1-F)(1-G)); minimum 1 at F = G = 1/N. F = rate, G = mean p."""
    if target <= 1:
        return torch.zeros_like(mean_prob)
    n = target
    return n / (n - 1) * ((n - 1) * rate * mean_prob + (1 - rate) * (1 - mean_prob))


@dataclass
class Chunks:
    x: torch.Tensor  # (B, M, D) selected units (zeros on padding)
    valid: torch.Tensor  # (B, M) bool
    positions: torch.Tensor  # (B, M) index of each concept's first unit


def downsample(x: torch.Tensor, boundary: torch.Tensor, min_len: int = 0) -> Chunks:
    """Keep the units where boundary is True, left-aligned and padded to the batch maximum (at least min_len)."""
    B, T, D = x.shape
    counts = boundary.sum(dim=1)
    M = max(int(counts.max()) if T else 0, min_len)
    slot = torch.where(boundary, boundary.cumsum(dim=1) - 1, torch.full_like(counts[:, None], M).expand(B, T))
    positions = torch.zeros(B, M + 1, dtype=torch.long, device=x.device)
    positions.scatter_(1, slot, torch.arange(T, device=x.device).expand(B, T))
    positions = positions[:, :M]
    valid = torch.arange(M, device=x.device)[None, :] < counts[:, None]
    chunks = torch.gather(x, 1, positions[..., None].expand(B, M, D)) * valid[..., None]
    return Chunks(chunks, valid, positions)


def gather_units(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values (B, T) at concept positions (B, M)."""
    return torch.gather(values, 1, positions)


def smooth(z: torch.Tensor, confidence: torch.Tensor, previous: torch.Tensor | None, eps: float,
           seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """EMA over concepts: z_bar_k = P_k z_k + (1 - P_k) z_bar_{k-1}, starting from `previous` (B, D) or 0.
    With seq_idx (B, M), the document index of each concept, the EMA restarts at a document's first concept:
    z_bar_k = P_k z_k there (`previous` belongs to the first concept's document; the caller zeroes it otherwise)."""
    B, M, D = z.shape
    dtype = compute_dtype(z.dtype)
    P = confidence.to(dtype).clamp(eps, 1 - eps)
    initial = None if previous is None else previous.to(dtype)[:, None, :, None]  # (B, h=1, p=D, n=1)
    ones = z.new_ones(B, M, 1, dtype=dtype)
    out, _ = ssd_scan((P[..., None] * z.to(dtype))[:, :, None, :], torch.log1p(-P)[..., None], ones, ones, 64,
                      initial, seq_idx)
    return out[:, :, 0].to(z.dtype)


def upsample(
    z_bar: torch.Tensor,  # (B, M, D) smoothed concept outputs
    boundary: torch.Tensor,  # (B, T) bool
    prob: torch.Tensor,  # (B, T)
    previous: torch.Tensor | None,  # (B, D) concept in force before this call (generation), None = none
    straight_through: bool,
) -> torch.Tensor:
    """Causal repeat: unit t takes the latest concept that starts at or before t."""
    B, T = boundary.shape
    before = z_bar.new_zeros(B, 1, z_bar.shape[-1]) if previous is None else previous[:, None].to(z_bar.dtype)
    extended = torch.cat((before, z_bar), dim=1)
    index = boundary.long().cumsum(dim=1)  # 0 = the concept from before this call
    out = torch.gather(extended, 1, index[..., None].expand(B, T, extended.shape[-1]))
    if straight_through:
        c = torch.where(boundary, prob, 1 - prob)
        out = out * (c + (1 - c).detach()).to(out.dtype)[..., None]
    return out
