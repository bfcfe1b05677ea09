"""The experts of one MoE layer: SwiGLU feed-forwards, and the bank of experts a rank holds.

Parameter names follow DeepSpeed's native MoE layout (`deepspeed_moe.experts.deepspeed_experts.<i>.*`) because
DeepSpeed's engine splits expert weights into per-expert checkpoint files by matching exactly that pattern
(engine._save_moe_checkpoint / load_moe_state_dict); those files are described in
synergy_dist/checkpoint/deepspeed_files.py. Nothing else in this file is DeepSpeed-specific.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUExpert(nn.Module):
    """y = W_down (silu(W_gate x) * W_up x). Plain parameters (not nn.Linear) so generic Linear re-initialisers
    elsewhere in the model leave expert weights alone (their init must not depend on expert-parallel size)."""

    def __init__(self, d_model: int, d_ff: int, generator: torch.Generator | None = None):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(d_ff, d_model))
        self.w_up = nn.Parameter(torch.empty(d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(d_model, d_ff))
        with torch.no_grad():
            self.w_gate.normal_(0.0, d_model**-0.5, generator=generator)
            self.w_up.normal_(0.0, d_model**-0.5, generator=generator)
            self.w_down.normal_(0.0, d_ff**-0.5, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


def mark_expert_parameters(module: nn.Module, group_name: str) -> None:
    """Tag parameters the way DeepSpeed recognises MoE parameters (deepspeed.moe.utils.is_moe_param):
    no data-parallel all-reduce; ZeRO reduces them over the expert-data-parallel group named `group_name`."""
    for param in module.parameters():
        param.allreduce = False
        param.group_name = group_name


class LocalExperts(nn.Module):
    """The experts stored on this rank: global ids first_expert .. first_expert + n_local - 1.

    Each expert's weights are drawn from its own generator seeded with (seed + global id), so a model built with
    expert-parallel size 2 holds exactly the experts an ep=1 model built from the same seed holds.
    """

    def __init__(self, d_model: int, d_ff: int, n_local: int, first_expert: int, seed: int, group_name: str):
        super().__init__()
        experts = []
        for local_id in range(n_local):
            generator = torch.Generator().manual_seed(seed + first_expert + local_id)
            experts.append(SwiGLUExpert(d_model, d_ff, generator))
        self.experts = nn.Module()  # naming level required by DeepSpeed's checkpoint layout (see module docstring)
        self.experts.deepspeed_experts = nn.ModuleList(experts)
        mark_expert_parameters(self, group_name)

    def __len__(self) -> int:
        return len(self.experts.deepspeed_experts)

    def forward(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """tokens: (M, D) sorted by local expert, tokens_per_expert: M split into contiguous slices.

        Every expert runs, even on an empty slice, so every expert parameter gets a gradient on every rank
        (ZeRO then reduces the same set of tensors everywhere)."""
        if sum(tokens_per_expert) != tokens.shape[0]:
            raise ValueError(f"LocalExperts got {tokens.shape[0]} tokens but slices summing to "
                             f"{sum(tokens_per_expert)}")
        outputs = [expert(chunk) for expert, chunk in zip(self.experts.deepspeed_experts,
                                                            torch.split(tokens, tokens_per_expert, dim=0))]
        return torch.cat(outputs, dim=0)
