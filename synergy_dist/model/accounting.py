"""Parameter counts per part and model FLOPs per byte (for MFU in training logs and benchmarks).

FLOPs count multiply-adds as 2 and follow the usual Chinchilla-style accounting: 2 x (matmul parameters)
per unit for every linear layer, plus the sequence mixing (attention scores, the SSD scan). A stage
running over concepts costs its per-unit FLOPs divided by the bytes per unit at that level. Training
FLOPs = 3 x forward (backward = 2 x forward). Embedding lookups, norms and element-wise ops are ignored.
A Mixture-of-Depths routed block runs on capacity x the positions (its attention over that many), plus its
router and causal predictor on every position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from synergy_dist.model.config import ModelConfig, StackConfig, mlp_hidden
from synergy_dist.model.moe.layer import MoEFeedForward
from synergy_dist.model.synergy import HierarchyStage


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per part: embedding, head, stage{s}/{encoder,router,decoder,other}, middle,
    experts (all MoE expert weights), total, and active (per token: experts scaled by top_k / n_experts)."""
    counts: dict[str, int] = {"embedding": _count(model.embed)}
    counts["head"] = 0 if model.head.weight is model.embed.weight else _count(model.head)
    node, level = model.body, 0
    while isinstance(node, HierarchyStage):
        counts[f"stage{level}/encoder"] = _count(node.encoder)
        counts[f"stage{level}/router"] = _count(node.router)
        counts[f"stage{level}/decoder"] = _count(node.decoder)
        counts[f"stage{level}/other"] = _count(node.residual) + _count(node.width)
        node, level = node.inner, level + 1
    counts["middle"] = _count(node)
    counts["total"] = sum(p.numel() for p in model.parameters())
    experts = active_experts = 0
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            n = _count(module.local_experts)
            experts += n
            active_experts += n * module.cfg.top_k / module.num_local_experts
    counts["experts"] = experts
    counts["active"] = int(counts["total"] - experts + active_experts)
    return counts


def stack_flops_per_unit(stack: StackConfig, d_model: int, length: int) -> float:
    """Forward FLOPs per position of one network over a sequence of `length` units."""
    routed = set(stack.mod_layer_indices())
    total = 0.0
    for i in range(len(stack.layers)):
        if i in routed:  # capacity x the positions go through it, and they attend among themselves
            capacity = stack.mod.capacity
            hidden = stack.mod.predictor_hidden or max(1, d_model // 4)
            total += 2 * d_model + 2 * (d_model * hidden + hidden)  # router and predictor, every position
            total += capacity * layer_flops_per_unit(stack, i, d_model, max(1, math.ceil(capacity * length)))
        else:
            total += layer_flops_per_unit(stack, i, d_model, length)
    return total


def layer_flops_per_unit(stack: StackConfig, i: int, d_model: int, length: int) -> float:
    """Forward FLOPs per processed position of layer i of a network over `length` processed positions."""
    total = 0.0
    moe_at = set(stack.moe_layer_indices())
    letter = stack.layers[i]
    if letter == "A":
        inner = stack.n_heads * (stack.head_dim or d_model // stack.n_heads)
        context = (length + 1) / 2 if stack.sliding_window == 0 else min(stack.sliding_window, (length + 1) / 2)
        total += 2 * 4 * d_model * inner  # qkv + out projections
        total += 2 * 2 * context * inner  # q.k scores and the weighted sum of values (causal average)
    else:
        m = stack.mamba
        d_inner = int(m.expand * d_model)
        heads = d_inner // m.head_dim
        q = min(m.chunk_size, length)
        total += 2 * d_model * (2 * d_inner + 2 * m.d_state + heads) + 2 * d_inner * d_model  # in/out proj
        total += 2 * (d_inner + 2 * m.d_state) * m.d_conv  # depthwise convolution
        total += 2 * (q / 2) * (m.d_state + d_inner)  # within-chunk C.B scores and their use on x
        total += 2 * 3 * d_inner * m.d_state  # chunk states, carried-state output, state update
    has_mlp = stack.mlp_ratio > 0 and (letter == "A" or stack.mlp_on_mamba)
    if i in moe_at:
        moe = stack.moe
        d_ff = moe.d_ff or mlp_hidden(d_model, stack.mlp_ratio)
        experts = moe.top_k + (1 if moe.shared_expert else 0)
        total += 2 * d_model * moe.n_experts + experts * 2 * 3 * d_model * d_ff
    elif has_mlp:
        total += 2 * 3 * d_model * mlp_hidden(d_model, stack.mlp_ratio)
    return total


def cumulative_bytes_per_concept(cfg: ModelConfig,
                                 bytes_per_concept: float | Sequence[float] | None = None) -> list[float]:
    """Cumulative bytes per concept after each stage, outermost first, from a list of them, one number for the
    innermost level (split evenly across stages), or None for the configured targets (their running product)."""
    n_stages = len(cfg.stages)
    if bytes_per_concept is None:
        cumulative, product = [], 1.0
        for stage in cfg.stages:
            product *= stage.router.target_bytes_per_concept
            cumulative.append(product)
    elif isinstance(bytes_per_concept, (int, float)):
        per_stage = float(bytes_per_concept) ** (1.0 / n_stages) if n_stages else 1.0
        cumulative = [per_stage ** (s + 1) for s in range(n_stages)]
    else:
        cumulative = [float(b) for b in bytes_per_concept]
        if len(cumulative) != n_stages:
            raise ValueError(f"bytes_per_concept has {len(cumulative)} values for {n_stages} stages")
    if any(b < 1 for b in cumulative):
        raise ValueError(f"bytes_per_concept={cumulative} must be >= 1")
    return cumulative


def flops_breakdown(cfg: ModelConfig, seq_len: int,
                    bytes_per_concept: float | Sequence[float] | None = None) -> dict[str, float]:
    """Forward FLOPs per byte of each part. bytes_per_concept: cumulative bytes per concept after each stage
    (a list, outermost first), one number for the innermost level (split evenly across stages), or None
    for the configured targets (the product of target_bytes_per_concept up to each stage)."""
    cumulative = cumulative_bytes_per_concept(cfg, bytes_per_concept)
    parts: dict[str, float] = {}
    bytes_per_unit = 1.0
    for s, stage in enumerate(cfg.stages):
        d = stage.d_model
        units = seq_len / bytes_per_unit
        parts[f"stage{s}/encoder"] = stack_flops_per_unit(stage.encoder, d, int(units)) / bytes_per_unit
        parts[f"stage{s}/decoder"] = stack_flops_per_unit(stage.decoder, d, int(units)) / bytes_per_unit
        router = 2 * 2 * d * d if stage.router.kind == "cosine" else (2 * d if stage.router.kind == "gate" else 0)
        d_inner = cfg.widths()[s + 1]
        width = 2 * 2 * d * d_inner if cfg.width_change == "linear" and d_inner != d else 0
        parts[f"stage{s}/router_residual"] = (router + 2 * d * d) / bytes_per_unit + width / cumulative[s]
        bytes_per_unit = cumulative[s]
    middle_units = max(int(seq_len / bytes_per_unit), 1)
    parts["middle"] = stack_flops_per_unit(cfg.middle, cfg.d_middle, middle_units) / bytes_per_unit
    parts["head"] = 2 * cfg.d_embed * cfg.vocab_size
    return parts


def flops_per_byte(cfg: ModelConfig, seq_len: int, bytes_per_concept: float | Sequence[float] | None = None,
                   training: bool = True) -> float:
    """Model FLOPs per byte: forward (training=False) or forward + backward (3x, training=True)."""
    forward = sum(flops_breakdown(cfg, seq_len, bytes_per_concept).values())
    return 3 * forward if training else forward
