"""The learning-rate schedule: linear warmup, then cosine, warmup-stable-decay (WSD) or constant.

The trainer sets each parameter group's lr to lr_at(step, cfg) times the group's lr_mult before every
optimizer step; the benchmarks use the same function, so what they measure is what users run.
"""

from __future__ import annotations

import math

from synergy_dist.config import Config


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
