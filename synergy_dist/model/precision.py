"""The precision policy: the modules whose weights and arithmetic stay float32 whatever the training dtype.

Boundary decisions are thresholds (p_t >= 0.5) on small differences of cosine similarities or gate scores,
and expert choices are top-k over small logit differences; bf16 keeps 8 significant bits, enough to flip
them. The zero-initialised residual projection learns from small updates that bf16 weights would round
away. H-Net keeps its routing module and residual projection in float32 for these reasons. So:

- `Float32Linear` (the boundary routers' projections and gate score, each stage's residual projection) and
  `ExpertGate` (the MoE gate) keep float32 parameters and compute with autocast off on float32 inputs;
  their forward raises `PrecisionError`, naming the module, the cause and the fix, if their weights are not
  float32;
- the EMA smoothing and the Mamba scan run in float32 (`float32_math` on ssd.py's scan);
- optionally (`StageConfig.encoder_fp32`) a stage's whole encoder (`Float32Stack`): the decisions depend on
  the encoder's output, and measured on trained checkpoints a bf16 encoder flips 0.1-0.15% of them, a bf16
  encoder with a float32 last layer as many, a float32 encoder none (docs/MODEL.md, "Precision policy");
- bf16 training keeps float32 parameters and runs under autocast (synergy_dist/train/ds_config.py), because
  DeepSpeed's "bf16" mode casts every parameter (docs/TRAINING.md, "Precision").

After a blanket cast (model.to(torch.bfloat16) for inference), `keep_fp32(model)` restores the policy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")


class PrecisionError(RuntimeError):
    """A module of the float32 policy found its weights in a narrower dtype (bf16, fp16)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The policy's arithmetic for tensors of `dtype`: float32 for float32 and narrower, float64 for float64
    (fp64 reference runs stay fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class KeepsFloat32:
    """Mixin for nn.Modules whose own parameters and floating buffers stay float32 under any model dtype
    (float64 is wider and allowed: fp64 reference runs).

    `float32_role` names the module in error messages. Subclasses with other dtypes to restore (the MoE
    layer's float64 load accumulator) extend `restore_float32`.
    """

    float32_role: str = "float32 module"
    float32_recurse: bool = False  # the policy covers the module's children too (a float32 encoder)

    def require_float32(self) -> None:
        """Raise PrecisionError unless every own parameter is float32 (or float64)."""
        for name, p in self.named_parameters(recurse=self.float32_recurse):  # type: ignore[attr-defined]
            if p.dtype not in (torch.float32, torch.float64):
                raise PrecisionError(
                    f"{self.float32_role} {name} is {p.dtype}, it must stay torch.float32 (or float64; boundary "
                    "and expert decisions are thresholds on small differences; see docs/MODEL.md, 'Precision "
                    "policy'). "
                    "Cause: something cast the model (model.to(torch.bfloat16) / .half(), or DeepSpeed's "
                    "\"bf16\"/\"fp16\" mode, which casts every parameter). Fix: train bf16 with float32 "
                    "parameters under autocast (precision.dtype=bf16 does; in your own DeepSpeed config "
                    "\"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"}), or restore the policy "
                    "after a cast with synergy_dist.model.precision.keep_fp32(model)")

    def restore_float32(self) -> int:
        """Own parameters and floating buffers narrower than float32 back to float32; returns how many
        parameters changed."""
        changed = 0
        for p in self.parameters(recurse=self.float32_recurse):  # type: ignore[attr-defined]
            if p.dtype not in (torch.float32, torch.float64):
                p.data = p.data.float()
                changed += 1
        for buffer in self.buffers(recurse=self.float32_recurse):  # type: ignore[attr-defined]
            if buffer.is_floating_point() and buffer.dtype not in (torch.float32, torch.float64):
                buffer.data = buffer.data.float()
        return changed


class Float32Linear(KeepsFloat32, nn.Linear):
    """nn.Linear with float32 weights that computes in float32 outside autocast: y = x.float() W^T (+ b),
    returned as float32 (float64 throughout for a float64 weight). Its own class, so DeepSpeed's torch_autocast
    (which marks exact nn.Linear weights for bf16 gradient communication) leaves its gradients in float32 too."""

    def __init__(self, in_features: int, out_features: int, bias: bool, role: str):
        super().__init__(in_features, out_features, bias=bias, dtype=torch.float32)
        self.float32_role = role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.require_float32()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(compute_dtype(self.weight.dtype)), self.weight, self.bias)


def float32_math(fn: Callable[..., T]) -> Callable[..., T]:
    """Run `fn` with autocast off on the device of its first (tensor) argument, so that a function that
    upcasts its inputs computes in float32 (autocast would run its matmuls and einsums in bf16)."""

    @functools.wraps(fn)
    def run(x: torch.Tensor, *args, **kwargs) -> T:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return run


def keep_fp32(model: nn.Module) -> int:
    """Undo a blanket model.to(dtype) for the float32 modules (routers, residual projections, expert gates,
    MoE balancing state). Returns how many parameters changed."""
    return sum(m.restore_float32() for m in model.modules() if isinstance(m, KeepsFloat32))


def float32_names(model: nn.Module) -> set[str]:
    """State-dict names of the parameters and persistent buffers the policy keeps in float32."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, KeepsFloat32):
            head = f"{prefix}." if prefix else ""
            names |= {head + n for n, t in module.state_dict(keep_vars=True).items()
                      if (module.float32_recurse or "." not in n) and t.is_floating_point()}
    return names
