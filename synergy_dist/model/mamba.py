"""Mamba-2 style selective state-space mixer in plain PyTorch.

Per head h with scalar decay a_t = exp(dt_t * A_h) (A_h < 0) and state H_t in R^{P x N}:
    H_t = a_t H_{t-1} + dt_t x_t B_t^T,      y_t = H_t C_t + D_h x_t
The training path evaluates this with the chunked "state space duality" algorithm: inside a chunk
of Q steps it is a masked (Q x Q) matmul (fast on CPU and GPU), between chunks a short recurrence
over chunk states. Generation steps the recurrence one token at a time; both give the same numbers
up to float rounding. `ssd_scan` is reused by the router's EMA smoothing (N = 1, B = C = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synergy_dist.model.config import MambaConfig
from synergy_dist.model.layers import RMSNorm

try:  # optional fused Triton kernel (GPU only)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # noqa: BLE001 - any import failure means "not available"
    mamba_chunk_scan_combined = None


def ssd_scan(
    x_dt: torch.Tensor,  # (b, l, h, p) inputs already multiplied by dt
    log_a: torch.Tensor,  # (b, l, h) log decay per step, <= 0
    B: torch.Tensor,  # (b, l, n)
    C: torch.Tensor,  # (b, l, n)
    chunk: int,
    initial: torch.Tensor | None = None,  # (b, h, p, n) state before the first step
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan; returns y (b, l, h, p) and the final state (b, h, p, n). Computed in float32."""
    out_dtype = x_dt.dtype
    x_dt, log_a, B, C = (t.float() for t in (x_dt, log_a, B, C))
    b, l, h, p = x_dt.shape
    n = B.shape[-1]
    Q = min(chunk, l)
    pad = (-l) % Q
    if pad:  # padded steps add nothing and do not decay (log_a = 0), so the final state is unchanged
        x_dt, log_a = F.pad(x_dt, (0, 0, 0, 0, 0, pad)), F.pad(log_a, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    c = (l + pad) // Q
    x_dt = x_dt.view(b, c, Q, h, p)
    B, C = B.view(b, c, Q, n), C.view(b, c, Q, n)
    cum = log_a.view(b, c, Q, h).permute(0, 3, 1, 2).cumsum(-1)  # (b, h, c, Q)

    # 1. within each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) x_j
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x_dt.device).tril()
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (b,h,c,Q,Q)
    weights = torch.einsum("bcin,bcjn->bcij", C, B)[:, None] * seg
    y = torch.einsum("bhcij,bcjhp->bcihp", weights, x_dt)

    # 2. state contributed by each chunk on its own, decayed to the chunk end
    to_end = (cum[..., -1:] - cum).exp()  # (b, h, c, Q)
    chunk_states = torch.einsum("bcjn,bcjhp->bchpn", B, x_dt * to_end.permute(0, 2, 3, 1)[..., None])

    # 3. recurrence over chunks, S_i = a_i S_{i-1} + s_i, as a log-depth (Hillis-Steele) scan: few large ops
    #    instead of c small ones. The decay over chunks (j, i] is exp(L_i - L_j) with L the cumulative log decay.
    chunk_log = cum[..., -1].transpose(1, 2).cumsum(1)  # (b, c, h)
    after = chunk_states  # after round k: sum over the last 2^k chunks
    step = 1
    while step < c:
        decay = (chunk_log[:, step:] - chunk_log[:, :-step]).exp()[..., None, None]
        after = torch.cat((after[:, :step], after[:, step:] + decay * after[:, :-step]), dim=1)
        step *= 2
    if initial is not None:
        after = after + chunk_log.exp()[..., None, None] * initial.float()[:, None]
    start = x_dt.new_zeros(b, 1, h, p, n) if initial is None else initial.float()[:, None]
    entering = torch.cat((start, after[:, :-1]), dim=1)  # (b, c, h, p, n) state entering each chunk
    state = after[:, -1]

    # 4. contribution of the entering state to every position of the chunk
    y = y + torch.einsum("bcin,bchpn->bcihp", C, entering) * cum.exp().permute(0, 2, 3, 1)[..., None]
    y = y.reshape(b, c * Q, h, p)[:, :l]
    return y.to(out_dtype), state


def ssd_step(x_dt, log_a, B, C, state):
    """One recurrent step. x_dt (b, h, p), log_a (b, h), B/C (b, n), state (b, h, p, n) float32."""
    state = log_a.float().exp()[..., None, None] * state + x_dt.float()[..., None] * B.float()[:, None, None, :]
    y = torch.einsum("bhpn,bn->bhp", state, C.float())
    return y.to(x_dt.dtype), state


@dataclass
class MambaCache:
    conv: torch.Tensor | None = None  # (b, conv_dim, d_conv - 1) last inputs of the convolution
    ssm: torch.Tensor | None = None  # (b, h, p, n) float32 state


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

    def forward(self, u: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        b, l, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads], dim=-1)
        xbc = self._conv(xbc, cache)
        x, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        x = x.view(b, l, self.n_heads, self.head_dim)
        initial = cache.ssm if cache is not None else None
        if cache is not None and l == 1 and initial is not None:
            y, state = ssd_step(x[:, 0] * dt[:, 0, :, None], dt[:, 0] * A, B[:, 0], C[:, 0], initial)
            y = y[:, None]
        elif self._use_kernel(x):
            y, state = mamba_chunk_scan_combined(
                x, dt, A, B[:, :, None], C[:, :, None], self.cfg.chunk_size,
                initial_states=initial, return_final_states=True,
            )
        else:
            y, state = ssd_scan(x * dt[..., None], dt * A, B, C, self.cfg.chunk_size, initial)
        if cache is not None:
            cache.ssm = state.float()
        y = y + x * self.D[:, None].to(x.dtype)
        y = self.norm(y.reshape(b, l, self.d_inner) * F.silu(z))
        return self.out_proj(y)

    def _conv(self, xbc: torch.Tensor, cache: MambaCache | None) -> torch.Tensor:
        """Causal depthwise convolution over time; the cache keeps the last d_conv - 1 inputs."""
        k = self.cfg.d_conv
        xt = xbc.transpose(1, 2)  # (b, conv_dim, l)
        prev = cache.conv if cache is not None and cache.conv is not None else xt.new_zeros(*xt.shape[:2], k - 1)
        xt = torch.cat((prev, xt), dim=-1)
        if cache is not None:
            cache.conv = xt[..., -(k - 1):] if k > 1 else xt[..., :0]
        return F.silu(F.conv1d(xt, self.conv.weight, self.conv.bias, groups=xt.shape[1])).transpose(1, 2)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return self.cfg.kernel == "auto" and mamba_chunk_scan_combined is not None and x.is_cuda
