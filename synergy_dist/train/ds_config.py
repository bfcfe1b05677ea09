"""The DeepSpeed JSON config, generated from our Config, with the user's extra JSON merged over it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from synergy_dist.config import Config


def deep_merge(base: dict, extra: dict) -> dict:
    """Recursively merge `extra` over `base` (extra wins; nested dicts merge key by key)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_ds_config(cfg: Config, world_size: int, dtype: torch.dtype) -> dict:
    """DeepSpeed settings for this run. The optimizer is ours (passed to deepspeed.initialize), and
    the learning rate is set by the trainer each step, so neither appears here."""
    z = cfg.deepspeed
    zero: dict = {"stage": z.zero_stage}
    if z.zero_stage in (1, 2):
        # Deterministic, simple reductions: no bucketing overlap tricks that could reorder sums.
        zero.update({"overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True})
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    ds: dict = {
        "train_batch_size": cfg.global_batch_sequences(),
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our optimizer is torch AdamW with a skip gate
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        # DeepSpeed's bf16 mode casts every parameter, and the routers, residual projections and expert gates
        # must stay float32 (model/precision.py), so bf16 keeps float32 parameters and computes under autocast.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif dtype == torch.float16:
        ds["fp16"] = {"enabled": True, "loss_scale": 0,
                      "initial_scale_power": cfg.precision.initial_loss_scale_power,
                      "loss_scale_window": cfg.precision.loss_scale_window}
    if z.extra_json:
        ds = deep_merge(ds, json.loads(Path(z.extra_json).read_text()))
    if z.extra:
        ds = deep_merge(ds, z.extra)
    return ds
