"""AdamW with a skip gate.

DeepSpeed wraps the optimizer (ZeRO partitions, bf16 master weights) and calls its step() after
computing the global grad norm. The gate lets the safeguards veto that step on every rank alike,
leaving parameters and Adam moments untouched, while DeepSpeed's own counters advance normally.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GatedAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate: Callable[[], bool] | None = None  # returns False to skip this update

    def step(self, closure=None):
        if self.gate is not None and not self.gate():
            return None
        return super().step(closure)
