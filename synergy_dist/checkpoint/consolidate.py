"""Full model weights from a checkpoint written by any number of ranks, as one ep=1 state dict.

Experts come from their per-expert files, already under global ids; under ZeRO-3 every parameter is
gathered from the ranks' partitions. Export and evaluation both load through this, so evaluating a
checkpoint and evaluating its export run the very same weights. Every .pt file of the checkpoint is
checked first (safe_load.py): a file whose loading would run code is refused, naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synergy_dist.checkpoint import safe_load
from synergy_dist.checkpoint.deepspeed_files import read_expert_states, read_module_state, read_zero3_fp32_weights


def consolidated_weights(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """{parameter name: full weight} of the model saved at `checkpoint` (written with `zero_stage`).
    Raises safe_load.UnsafeCheckpointError for a file that would run code when loaded."""
    safe_load.check_checkpoint(checkpoint)
    if zero_stage == 3:  # parameters live only in the ZeRO-3 partitions
        return read_zero3_fp32_weights(checkpoint)
    merged = read_module_state(checkpoint)
    merged.update(read_expert_states(checkpoint))
    return merged
