"""The project's device policy in one place: CUDA when torch sees a GPU, else CPU.

DeepSpeed reads DS_ACCELERATOR when it is first imported; left unset, it probes the machine and
announces "Setting accelerator to CPU" on stdout, which would mix with what `synergy-generate` and
`synergy-eval --json` write there. So every module that imports DeepSpeed calls this first.
"""

from __future__ import annotations

import os

import torch


def uses_cuda() -> bool:
    """Whether this process computes on CUDA: a GPU is visible and DS_ACCELERATOR does not say cpu."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"


def set_deepspeed_accelerator() -> str:
    """Tell DeepSpeed the accelerator this policy picks (a value the user exported wins); returns it."""
    return os.environ.setdefault("DS_ACCELERATOR", "cuda" if uses_cuda() else "cpu")
