"""Seeding the random generators (Python, NumPy, torch): the same seed gives the same model and stream."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators from `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s own stream (MoE jitter, dropout); `step` moves it on after an elastic
    resume, whose saved per-rank generator states belong to another number of ranks."""
    return seed * 1_000_003 + 7919 * (rank + 1) + step
