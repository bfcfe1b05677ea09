"""The chunked SSD ("state space duality") scan of a scalar-decay linear recurrence, and its one-step form.

Per head h with log decay log_a_t <= 0 and state H_t in R^{P x N}:
    H_t = exp(log_a_t) H_{t-1} + x_t B_t^T,      y_t = H_t C_t
Inside a chunk of Q steps the scan is a masked (Q x Q) matmul (fast on CPU and GPU), between chunks a short
recurrence over chunk states. Mamba-2 (mamba.py) and the EMA smoothing of dynamic chunking (chunking.py,
N = 1, B = C = 1) both run on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synergy_dist.model.precision import float32_math


@float32_math  # the scan's einsums stay float32 under autocast
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


@float32_math
def ssd_step(x_dt, log_a, B, C, state):
    """One recurrent step. x_dt (b, h, p), log_a (b, h), B/C (b, n), state (b, h, p, n) float32."""
    state = log_a.float().exp()[..., None, None] * state + x_dt.float()[..., None] * B.float()[:, None, None, :]
    y = torch.einsum("bhpn,bn->bhp", state, C.float())
    return y.to(x_dt.dtype), state
