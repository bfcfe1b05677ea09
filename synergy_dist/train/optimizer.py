"""AdamW with a skip gate, and the learning-rate schedule.

DeepSpeed wraps the optimizer (ZeRO partitions, bf16 master weights) and calls its step() after
computing the global grad norm. The gate lets the safeguards veto that step on every rank alike,
leaving parameters and Adam moments untouched, while DeepSpeed's own counters advance normally.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from synergy_dist.config import Config


class GatedAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate: Callable[[], bool] | None = None  # returns False to skip this update

    def step(self, closure=None):
        if self.gate is not None and not self.gate():
            return None
        return super().step(closure)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine / WSD / constant."""
    peak, s = cfg.train.lr, cfg.schedule
    floor = peak * s.min_lr_ratio
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    total = max(cfg.train.max_steps, s.warmup_steps + 1)
    if s.kind == "constant":
        return peak
    if s.kind == "cosine":
        progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total - int(s.decay_fraction * total)  # wsd: stable until the last decay_fraction
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return peak + (floor - peak) * progress
