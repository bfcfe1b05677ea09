"""The chunked SSD ("state space duality") scan of a scalar-decay linear recurrence, and its one-step form.

Per head h with log decay log_a_t <= 0 and state H_t in R^{P x N}:
    H_t = exp(log_a_t) H_{t-1} + x_t B_t^T,      y_t = H_t C_t
Inside a chunk of Q steps the scan is a masked (Q x Q) matmul (fast on CPU and GPU), between chunks a short
recurrence over chunk states. Mamba-2 (mamba.py) and the EMA smoothing of dynamic chunking (chunking.py,
N = 1, B = C = 1) both run on it.

Packed documents: with `seq_idx` (b, l), a nondecreasing document index per step, no contribution crosses a
change of document (the state restarts from zero at a document's first step), as mamba_ssm's `seq_idx`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synergy_dist.model.precision import compute_dtype, float32_math


@float32_math  # the scan's einsums stay float32 under autocast
def ssd_scan(
    x_dt: torch.Tensor,  # (b, l, h, p) inputs already multiplied by dt
    log_a: torch.Tensor,  # (b, l, h) log decay per step, <= 0
    B: torch.Tensor,  # (b, l, n)
    C: torch.Tensor,  # (b, l, n)
    chunk: int,
    initial: torch.Tensor | None = None,  # (b, h, p, n) state before the first step
    seq_idx: torch.Tensor | None = None,  # (b, l) nondecreasing document index per step; None = one sequence
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan; returns y (b, l, h, p) and the final state (b, h, p, n) of the last step's document.
    Computed in float32 (float64 for float64 inputs). `initial` belongs to the first step's document: the caller
    zeroes it when the first step starts a new one."""
    out_dtype = x_dt.dtype
    x_dt, log_a, B, C = (t.to(compute_dtype(out_dtype)) for t in (x_dt, log_a, B, C))
    b, l, h, p = x_dt.shape
    n = B.shape[-1]
    Q = min(chunk, l)
    pad = (-l) % Q
    if pad:  # padded steps add nothing and do not decay (log_a = 0), so the final state is unchanged
        x_dt, log_a = F.pad(x_dt, (0, 0, 0, 0, 0, pad)), F.pad(log_a, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
        if seq_idx is not None:  # padded steps join the last document
            seq_idx = torch.cat((seq_idx, seq_idx[:, -1:].expand(b, pad)), dim=1)
    c = (l + pad) // Q
    x_dt = x_dt.view(b, c, Q, h, p)
    B, C = B.view(b, c, Q, n), C.view(b, c, Q, n)
    log_a = log_a.view(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    doc = None if seq_idx is None else seq_idx.reshape(b, c, Q)
    doc_end = None if doc is None else doc[:, :, -1]  # (b, c) document of each chunk's last step
    allowed = torch.ones(Q, Q, dtype=torch.bool, device=x_dt.device).tril()
    if doc is None:
        cum = log_a.cumsum(-1)
    else:
        # The cumulative log decay restarts at each document start (a sum over the earlier steps of the same
        # document), so that not even round-off of cum_i - cum_j carries a gradient across documents. A masked
        # sum rather than a matmul: autocast would run a matmul in bf16.
        allowed = (allowed & (doc[..., :, None] == doc[..., None, :]))[:, None]  # (b, 1, c, Q, Q)
        cum = (allowed * log_a[..., None, :]).sum(-1)

    # 1. within each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) x_j   (j in i's document)
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~allowed, float("-inf")).exp()  # (b,h,c,Q,Q)
    weights = torch.einsum("bcin,bcjn->bcij", C, B)[:, None] * seg
    y = torch.einsum("bhcij,bcjhp->bcihp", weights, x_dt)

    # 2. state contributed by each chunk on its own, decayed to the chunk end
    to_end = cum[..., -1:] - cum  # (b, h, c, Q)
    if doc is not None:  # only the steps of the chunk's last document reach its end state
        to_end = to_end.masked_fill(~(doc == doc_end[..., None])[:, None], float("-inf"))
    to_end = to_end.exp()
    chunk_states = torch.einsum("bcjn,bcjhp->bchpn", B, x_dt * to_end.permute(0, 2, 3, 1)[..., None])

    # 3. recurrence over chunks, S_i = a_i S_{i-1} + s_i, as a log-depth (Hillis-Steele) scan: few large ops
    #    instead of c small ones. The decay over chunks (j, i] is exp(L_i - L_j) with L the cumulative log decay.
    #    With documents, L restarts with each chunk-end document and a document starting in (j, i] cuts chunk j
    #    off from chunk i.
    if doc_end is None:
        chunk_log = cum[..., -1].transpose(1, 2).cumsum(1)  # (b, c, h)
    else:
        same_end = (doc_end[:, :, None] == doc_end[:, None, :]).tril()  # (b, c, c)
        chunk_log = (same_end[..., None] * cum[..., -1].transpose(1, 2)[:, None]).sum(2)  # (b, c, h)
    after = chunk_states  # after round k: sum over the last 2^k chunks
    step = 1
    while step < c:
        decay = chunk_log[:, step:] - chunk_log[:, :-step]
        if doc_end is not None:
            decay = decay.masked_fill(~(doc_end[:, step:] == doc_end[:, :-step])[..., None], float("-inf"))
        decay = decay.exp()[..., None, None]
        after = torch.cat((after[:, :step], after[:, step:] + decay * after[:, :-step]), dim=1)
        step *= 2
    if initial is not None:
        initial = initial.to(x_dt.dtype)
        carried = chunk_log.exp()[..., None, None]
        if doc_end is not None:
            carried = carried * (doc_end == doc[:, :1, 0])[..., None, None, None]
        after = after + carried * initial[:, None]
    start = x_dt.new_zeros(b, 1, h, p, n) if initial is None else initial[:, None]
    entering = torch.cat((start, after[:, :-1]), dim=1)  # (b, c, h, p, n) state entering each chunk
    state = after[:, -1]

    # 4. contribution of the entering state to every position of the chunk (of the entering state's document)
    entering_decay = cum.exp().permute(0, 2, 3, 1)[..., None]  # (b, c, Q, h, 1)
    if doc is not None:
        entering_doc = torch.cat((doc[:, :1, 0], doc_end[:, :-1]), dim=1)  # (b, c)
        entering_decay = entering_decay * (doc == entering_doc[..., None])[..., None, None]
    y = y + torch.einsum("bcin,bchpn->bcihp", C, entering) * entering_decay
    y = y.reshape(b, c * Q, h, p)[:, :l]
    return y.to(out_dtype), state


@float32_math
def ssd_step(x_dt, log_a, B, C, state):
    """One recurrent step. x_dt (b, h, p), log_a (b, h), B/C (b, n), state (b, h, p, n) in compute_dtype."""
    dtype = compute_dtype(x_dt.dtype)
    x_dt_b = x_dt.to(dtype)[..., None] * B.to(dtype)[:, None, None, :]
    state = log_a.to(dtype).exp()[..., None, None] * state.to(dtype) + x_dt_b
    y = torch.einsum("bhpn,bn->bhp", state, C.to(dtype))
    return y.to(x_dt.dtype), state


