"""Mamba-2 style selective state-space mixer in plain PyTorch.

Per head h with scalar decay a_t = exp(dt_t * A_h) (A_h < 0) and state H_t in R^{P x N}:
    H_t = a_t H_{t-1} + dt_t x_t B_t^T,      y_t = H_t C_t + D_h x_t
Training runs the chunked SSD scan (ssd.py, or mamba_ssm's fused kernel on GPU when installed);
generation steps the recurrence one token at a time; both give the same numbers up to float rounding.
With a document index `seq_idx` (packed documents) neither the convolution nor the scan reads across a
document start, in one call or from the cache of earlier calls.
A cached call may pad rows at the end (`valid`, right padding, as for attention): a pad step has dt = 0, so it
neither adds to the state nor decays it, and the convolution cache keeps each row's last real inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synergy_dist.model.config import MambaConfig
from synergy_dist.model.kernels import mamba_chunk_scan
from synergy_dist.model.layers import RMSNorm
from synergy_dist.model.precision import compute_dtype
from synergy_dist.model.ssd import ssd_scan, ssd_step

mamba_chunk_scan_combined = mamba_chunk_scan()  # mamba_ssm's fused Triton scan (GPU), or None


@dataclass
class MambaCache:
    conv: torch.Tensor | None = None  # (b, conv_dim, d_conv - 1) last inputs of the convolution
    ssm: torch.Tensor | None = None  # (b, h, p, n) state (float32; float64 for a float64 model)
    conv_doc: torch.Tensor | None = None  # (b, d_conv - 1) document index of those inputs (with seq_idx)
    doc: torch.Tensor | None = None  # (b,) document index of the last step, to which `ssm` belongs (with seq_idx)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, cfg: MambaConfig, eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        self.d_inner = int(cfg.expand * d_model)
        self.n_heads = self.d_inner // cfg.head_dim
        self.head_dim = cfg.head_dim
        self.d_state = cfg.d_state
        conv_dim = self.d_inner + 2 * cfg.d_state
        # one projection gives z (gate), x, B, C and dt
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * cfg.d_state + self.n_heads, bias=False)
        self.conv = nn.Conv1d(conv_dim, conv_dim, cfg.d_conv, groups=conv_dim, bias=True)
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p.no_weight_decay = True
        self.norm = RMSNorm(self.d_inner, eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj.is_residual_out = True

    def new_cache(self) -> MambaCache:
        return MambaCache()

    def forward(self, u: torch.Tensor, cache: MambaCache | None = None,
                seq_idx: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """u (b, l, d); seq_idx (b, l) nondecreasing document index (continuing the cache's), None = one sequence;
        valid (b, l) bool, with a cache only: each row's real steps, a prefix of the row (None = all)."""
        b, l, _ = u.shape
        pads = None if cache is None or valid is None or bool(valid.all()) else ~valid
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads], dim=-1)
        xbc = self._conv(xbc, cache, seq_idx, valid if pads is not None else None)
        x, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # (b, l, h)
        if pads is not None:  # pad steps leave the state as it is (where, not a product: no NaN gets through)
            dt = dt.masked_fill(pads[..., None], 0.0)
            x = x.masked_fill(pads[..., None], 0.0)
        A = -torch.exp(self.A_log.to(compute_dtype(self.A_log.dtype)))  # (h,)
        x = x.view(b, l, self.n_heads, self.head_dim)
        initial = cache.ssm if cache is not None else None
        if initial is not None and seq_idx is not None and cache.doc is not None:  # a new document starts afresh
            initial = initial * (seq_idx[:, 0] == cache.doc).to(initial.dtype)[:, None, None, None]
        if cache is not None and l == 1 and initial is not None:
            y, state = ssd_step(x[:, 0] * dt[:, 0, :, None], dt[:, 0] * A, B[:, 0], C[:, 0], initial)
            y = y[:, None]
        elif self._use_kernel(x):
            # mamba_ssm counts documents from 0 = the document of the initial state (the first step's here)
            kernel_idx = None if seq_idx is None else (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
            y, state = mamba_chunk_scan_combined(
                x, dt, A, B[:, :, None], C[:, :, None], self.cfg.chunk_size,
                initial_states=initial, seq_idx=kernel_idx, return_final_states=True,
            )
        else:
            y, state = ssd_scan(x * dt[..., None], dt * A, B, C, self.cfg.chunk_size, initial, seq_idx)
        if cache is not None:
            cache.ssm = state.to(compute_dtype(x.dtype))
            cache.doc = None if seq_idx is None else seq_idx[:, -1]
        y = y + x * self.D[:, None].to(x.dtype)
        y = self.norm(y.reshape(b, l, self.d_inner) * F.silu(z))
        return self.out_proj(y)

    def _conv(self, xbc: torch.Tensor, cache: MambaCache | None, seq_idx: torch.Tensor | None,
              valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal depthwise convolution over time; the cache keeps the last d_conv - 1 inputs (each row's last real
        ones with `valid`). With seq_idx an output reads only inputs of its own document (inputs of another
        document count as zero)."""
        k = self.cfg.d_conv
        xt = xbc.transpose(1, 2)  # (b, conv_dim, l)
        prev = cache.conv if cache is not None and cache.conv is not None else xt.new_zeros(*xt.shape[:2], k - 1)
        xt = torch.cat((prev, xt), dim=-1)
        # the last d_conv - 1 inputs before each row's first pad (its real inputs are a prefix)
        kept = None if valid is None else valid.sum(dim=1)[:, None] + torch.arange(k - 1, device=xt.device)
        if cache is not None:
            if kept is not None:
                cache.conv = xt.gather(-1, kept[:, None, :].expand(-1, xt.shape[1], -1))
            else:
                cache.conv = xt[..., -(k - 1):] if k > 1 else xt[..., :0]
        y = F.conv1d(xt, self.conv.weight, self.conv.bias, groups=xt.shape[1])  # (b, conv_dim, l)
        if seq_idx is None or k == 1:
            return F.silu(y).transpose(1, 2).contiguous()  # contiguous: inductor cannot order symbolic strides
        no_doc = torch.full_like(seq_idx[:, :1], -1).expand(-1, k - 1)  # the zero inputs before the first call
        prev_doc = cache.conv_doc if cache is not None and cache.conv_doc is not None else no_doc
        docs = torch.cat((prev_doc, seq_idx), dim=1)  # (b, k - 1 + l)
        if cache is not None:
            cache.conv_doc = docs[:, -(k - 1):] if kept is None else docs.gather(1, kept)
        # Only the first d_conv - 1 outputs of a document read across its start: those take the sum over their
        # window's same-document inputs instead (out_t = bias + sum of w_j x_j over inputs of t's document). Computed
        # densely, one shifted multiply-add per tap, and selected with `where`: no data-dependent indexing, so no
        # host synchronisation and one graph under torch.compile; every other output keeps the convolution's value.
        same = docs.unfold(1, k, 1) == seq_idx[..., None]  # (b, l, k): which inputs of t's window are t's document
        l = seq_idx.shape[1]
        weight = self.conv.weight[:, 0]  # (conv_dim, k)
        own = self.conv.bias[None, :, None]  # in the parameters' dtype (float32 under autocast), as the old fix-up
        for j in range(k):  # tap j reads input t - (k - 1) + j
            own = own + xt[..., j:j + l] * weight[None, :, j, None] * same[:, None, :, j]
        y = torch.where(same.all(dim=-1)[:, None, :], y, own.to(y.dtype))
        return F.silu(y).transpose(1, 2).contiguous()

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return self.cfg.kernel == "auto" and mamba_chunk_scan_combined is not None and x.is_cuda
