"""DeepSpeed engine + MoE layer on 2 gloo ranks, expert-parallel size 2, ZeRO-1 and ZeRO-2, torch Adam:
the engine recognises the layer as MoE, reduces expert gradients over the expert-data-parallel group, and its
optimizer steps give the same weights as a single-process ep=1 reference; its MoE checkpoint round-trips;
bf16 through torch_autocast keeps the router in fp32."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from two_ranks import run_on_two_ranks

D_MODEL, D_FF, N_EXPERTS, LR, CLIP = 8, 12, 4, 1e-2, 1.0
VALID_TOKENS = [[9, 5], [3, 7]]  # per step, per rank: ranks hold different numbers of concept tokens


class TinyMoEModel(nn.Module):
    def __init__(self, ep_size: int):
        super().__init__()
        from synergy_dist.model.config import MoEConfig
        from synergy_dist.model.moe.layer import MoEFeedForward

        self.inp = nn.Linear(D_MODEL, D_MODEL)
        self.moe = MoEFeedForward(D_MODEL, D_FF, MoEConfig(n_experts=N_EXPERTS, top_k=2, shared_expert=True,
                                                           expert_parallel_size=ep_size))
        self.out = nn.Linear(D_MODEL, 1)

    def forward(self, x, valid, target):
        h = self.inp(x)
        y, stats = self.moe(h, valid)
        pred = self.out(h + y).squeeze(-1)
        mse = ((pred - target) ** 2 * valid).sum() / valid.sum().clamp_min(1)
        return mse + 1e-2 * stats.z_loss


def make_batch(step: int, rank: int):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(2, 6, D_MODEL, generator=generator)
    valid = torch.zeros(12, dtype=torch.bool)
    valid[torch.randperm(12, generator=generator)[: VALID_TOKENS[step][rank]]] = True
    target = torch.randn(2, 6, generator=generator)
    return x, valid.view(2, 6), target


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": CLIP,  # the global norm must include every rank's experts exactly once
        "steps_per_print": 1000,
    }


def reference_weights() -> dict[str, torch.Tensor]:
    """ep=1, one process, the data-parallel mean of both ranks' losses, global-norm clipping, torch AdamW."""
    torch.manual_seed(0)
    model = TinyMoEModel(ep_size=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.eval()  # eval: no world all-reduce of expert counts (dropless, no jitter: same maths as training)
    for step in range(len(VALID_TOKENS)):
        optimizer.zero_grad()
        loss = sum(model(*make_batch(step, r)) for r in range(2)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def global_name(name: str, rank: int) -> str:
    """Local expert i on rank r is global expert r * n_local + i."""
    prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
    if not name.startswith(prefix):
        return name
    local_id, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{rank * (N_EXPERTS // 2) + int(local_id)}.{rest}"


def run_stage(rank: int, stage: int, reference: dict, checkpoint_dir: str) -> None:
    import deepspeed
    from deepspeed.moe.layer import MoE

    from synergy_dist.model.moe.layer import moe_param_groups

    torch.manual_seed(0)
    model = TinyMoEModel(ep_size=2)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model),
                                           config=ds_config(stage))
    assert isinstance(model.moe, MoE) and engine.has_moe_layers and engine.num_experts == [N_EXPERTS]
    assert dist.get_world_size(engine.expert_data_parallel_group["ep_size_2"]) == 1
    for step in range(len(VALID_TOKENS)):
        loss = engine(*make_batch(step, rank))
        engine.backward(loss)
        engine.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[global_name(name, rank)], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"ZeRO-{stage} rank {rank}: {name} differs from "
                                                            f"the ep=1 reference: {m}")

    # DeepSpeed's own MoE checkpoint layout works with our layer: one file per global expert, and a reload
    # into a freshly initialised engine restores every weight.
    engine.save_checkpoint(checkpoint_dir, tag=f"zero{stage}")
    dist.barrier()
    expert_files = sorted(f for f in os.listdir(os.path.join(checkpoint_dir, f"zero{stage}")) if "expert" in f)
    assert expert_files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(N_EXPERTS)]
    torch.manual_seed(123)
    fresh_model = TinyMoEModel(ep_size=2)
    fresh, _, _, _ = deepspeed.initialize(model=fresh_model, model_parameters=moe_param_groups(fresh_model),
                                          config=ds_config(stage))
    fresh.load_checkpoint(checkpoint_dir, tag=f"zero{stage}")
    for (name, p), p_fresh in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(p, p_fresh), f"ZeRO-{stage} rank {rank}: {name} not restored"


def run_mixed_precision(rank: int) -> None:
    """bf16 the way MoE needs it: DeepSpeed torch_autocast keeps parameters (and so the router) in fp32 and
    trains; DeepSpeed's "bf16" mode casts every parameter, which the router refuses with an actionable error."""
    import deepspeed

    from synergy_dist.model.moe.layer import moe_param_groups

    torch.manual_seed(0)
    model = TinyMoEModel(ep_size=2)
    config = {**ds_config(2), "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=config)
    before = model.moe.router.weight.detach().clone()
    loss = engine(*make_batch(0, rank))
    engine.backward(loss)
    engine.step()
    assert model.moe.router.weight.dtype == torch.float32 and torch.isfinite(loss)
    assert not torch.equal(before, model.moe.router.weight)

    torch.manual_seed(0)
    model = TinyMoEModel(ep_size=2)
    config = {**ds_config(2), "bf16": {"enabled": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), config=config)
    x, valid, target = make_batch(0, rank)
    with pytest.raises(RuntimeError, match="MoE router weight is torch.bfloat16, it must stay torch.float32"):
        engine(x.bfloat16(), valid, target.bfloat16())


def _two_rank_body(rank: int, tmp_dir: str) -> None:
    reference = reference_weights()
    for stage in (1, 2):
        try:
            run_stage(rank, stage, reference, os.path.join(tmp_dir, "ckpt"))
        except Exception as error:
            raise AssertionError(f"ZeRO-{stage} failed on rank {rank}") from error
    run_mixed_precision(rank)


def test_deepspeed_zero12_expert_parallel_step_matches_reference(tmp_path):
    run_on_two_ranks(_two_rank_body, tmp_path, str(tmp_path))
