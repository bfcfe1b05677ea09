"""The benchmarks' one plain training step, built on the library's pieces and nothing else.

torch AdamW over a model's parameter groups (each group's "lr_mult" applied), with a training Config's
optimizer settings (betas, eps, weight decay, gradient clipping) and learning-rate schedule (lr_at),
and the MoE bias update once per step: what synergy-train's step does, without DeepSpeed and the
trainer around it. The training benchmark times it against Trainer.train_step(); the quality
comparison trains its rows with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from synergy_dist.config import Config
from synergy_dist.model.chunking import set_router_warmup
from synergy_dist.model.moe.layer import update_moe_biases
from synergy_dist.train.schedule import lr_at


class PlainLoop:
    """Optimizer steps of `module` over `param_groups` (torch param-group dicts, optionally with "lr_mult")."""

    def __init__(self, module: torch.nn.Module, param_groups: list[dict], cfg: Config):
        o = cfg.optim
        self.cfg = cfg
        self.module = module
        self.optimizer = torch.optim.AdamW(param_groups, lr=cfg.train.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def step(self, step: int, micro_batches: Iterable[Any], loss_fn: Callable[[Any], tuple[torch.Tensor, Any]]) -> list:
        """Optimizer step `step` (0-based: its learning rate is lr_at(step)): for each micro-batch,
        loss_fn(micro_batch) -> (loss, info) and backward of loss / number of micro-batches; then clipping,
        the AdamW update and the MoE bias update. Returns the infos, in order."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg) * group.get("lr_mult", 1.0)
        set_router_warmup(self.module, step)
        micro_batches = list(micro_batches)
        infos = []
        for batch in micro_batches:
            loss, info = loss_fn(batch)
            (loss / len(micro_batches)).backward()
            infos.append(info)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_moe_biases(self.module)
        return infos
