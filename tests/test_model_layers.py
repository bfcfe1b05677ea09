"""Layers: SSD scan vs the plain recurrence, cached == full for attention and Mamba, RoPE, sliding window."""

import math

import pytest
import torch

from synergy_dist.model.config import MambaConfig, StackConfig
from synergy_dist.model.layers import Attention, AttentionCache, RMSNorm, RotaryEmbedding
from synergy_dist.model.mamba import Mamba2, MambaCache
from synergy_dist.model.ssd import ssd_scan, ssd_step
from synergy_dist.model.stack import Stack


def naive_recurrence(x_dt, log_a, B, C, initial):
    state, ys = initial.clone(), []
    for t in range(x_dt.shape[1]):
        state = log_a[:, t].exp()[..., None, None] * state + x_dt[:, t, ..., None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", state, C[:, t]))
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("length,chunk", [(1, 4), (37, 8), (64, 16), (20, 64), (301, 4)])
def test_ssd_scan_equals_recurrence(length, chunk):
    g = torch.Generator().manual_seed(length)
    b, h, p, n = 2, 3, 4, 5
    x = torch.randn(b, length, h, p, generator=g)
    log_a = -torch.rand(b, length, h, generator=g) * 2
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    initial = torch.randn(b, h, p, n, generator=g)
    y, final = ssd_scan(x, log_a, B, C, chunk, initial)
    y_ref, final_ref = naive_recurrence(x, log_a, B, C, initial)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_ref, atol=1e-4, rtol=1e-4)
    y_step, s = [], initial
    for t in range(length):
        out, s = ssd_step(x[:, t], log_a[:, t], B[:, t], C[:, t], s)
        y_step.append(out)
    torch.testing.assert_close(torch.stack(y_step, 1), y_ref, atol=1e-5, rtol=1e-5)


def test_mamba_cached_steps_equal_full_sequence():
    torch.manual_seed(0)
    layer = Mamba2(32, MambaConfig(d_state=8, head_dim=8, chunk_size=8))
    x = torch.randn(2, 29, 32)
    full = layer(x)
    cache = MambaCache()
    parts = [layer(x[:, :11], cache)] + [layer(x[:, t:t + 1], cache) for t in range(11, 20)] + [layer(x[:, 20:], cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window,rope,qk_norm",
                         [(0, "rope", False), (5, "rope", True), (0, "none", False), (3, "none", True)])
def test_attention_cached_equals_full_and_reference(window, rope, qk_norm):
    torch.manual_seed(1)
    cfg = StackConfig(pattern="A", n_heads=2, pos_encoding=rope, sliding_window=window, qk_norm=qk_norm)
    attn = Attention(16, cfg, 1e-5)
    x = torch.randn(1, 13, 16)
    full = attn(x)
    cache = AttentionCache()
    parts = [attn(x[:, :4], cache)] + [attn(x[:, t:t + 1], cache) for t in range(4, 9)] + [attn(x[:, 9:], cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    if window:
        assert cache.k.shape[2] == window  # the cache keeps only what the window can see
    # reference: explicit softmax with the causal (and window) mask
    B, T, _ = x.shape
    q, k, v = attn.qkv(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope == "rope":
        q, k = attn.rope(q, 0), attn.rope(k, 0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    ref = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, T, 16)
    torch.testing.assert_close(attn.out(ref), full, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    scores = [(rope(q, s + 3) * rope(k, s)).sum().item() for s in (0, 5, 100)]
    assert max(scores) - min(scores) < 1e-4
    assert abs((rope(q, 7) * rope(k, 0)).sum().item() - scores[0]) > 1e-3  # another offset, another score


def test_rmsnorm_normalises():
    norm = RMSNorm(6)
    y = norm(torch.full((2, 6), 3.0))
    torch.testing.assert_close(y, torch.ones(2, 6), atol=1e-4, rtol=0)


def test_stack_layer_pattern_and_final_norm():
    stack = Stack(16, StackConfig(pattern="AM", repeat=2, n_heads=2, mamba=MambaConfig(d_state=4, head_dim=8)), 1e-5)
    kinds = [type(b.mixer).__name__ for b in stack.blocks]
    assert kinds == ["Attention", "Mamba2", "Attention", "Mamba2"]
    assert [b.ffn is not None for b in stack.blocks] == [True, False, True, False]  # H-Net: no MLP on Mamba
    y, layers = stack(torch.randn(1, 5, 16))
    assert layers.moe == {} and layers.mod == {}  # neither MoE nor Mixture-of-Depths layers
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(1, 5), atol=1e-3, rtol=0)  # ends with RMSNorm
