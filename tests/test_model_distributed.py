"""SynergyLM with expert-parallel MoE on 2 real gloo ranks that hold different numbers of concepts.

Rank r feeds its own bytes, so the router gives the ranks different concept counts. With experts split
over the two ranks (ep=2) the logits and gradients must equal those of one ep=1 model run on each rank's
input (expert gradients: the sum over both ranks' inputs, since each rank's experts serve both).
"""

from __future__ import annotations

import os

import pytest
import torch
from two_ranks import run_on_two_ranks

pytestmark = pytest.mark.slow


def make_model(ep_size: int):
    from model_configs import tiny_test_config

    from synergy_dist.model.config import MoEConfig
    from synergy_dist.model.synergy import SynergyLM

    cfg = tiny_test_config(router="cosine", layers="MA", middle="AA")
    cfg.init_std = 0.2
    cfg.middle.moe_every = 1
    cfg.middle.moe = MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.0, expert_parallel_size=ep_size)
    torch.manual_seed(0)
    return SynergyLM(cfg)


def rank_input(rank: int) -> torch.Tensor:
    text = [b"aaaa bbbb cccc dddd eeee ffff gggg hhhh", b"The quick brown fox jumps over the lazy dogs!"][rank]
    return torch.tensor([list(text[:36]), list(text[3:39])])


def middle_concepts(model, ids) -> int:
    seen = []
    handle = model.body.inner.register_forward_hook(lambda mod, args, out: seen.append(args[1].sum().item()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return int(seen[0])


def expert_grad(model, layer: int, expert: int) -> torch.Tensor:
    return model.body.inner.blocks[layer].ffn.local_experts.experts.deepspeed_experts[expert].w_gate.grad


def two_rank_body(rank: int, out_dir: str) -> None:
    model = make_model(ep_size=2)
    ids = rank_input(rank)
    out = model(ids, labels=ids)
    out.loss.backward()
    result = {
        "logits": out.logits.detach(),
        "qkv_grad": model.body.inner.blocks[0].mixer.qkv.weight.grad,
        "expert_grads": {(layer, e): expert_grad(model, layer, e).clone() for layer in (0, 1) for e in (0, 1)},
        "concepts": middle_concepts(model.eval(), ids),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_expert_parallel_model_matches_single_process(tmp_path):
    run_on_two_ranks(two_rank_body, tmp_path, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert results[0]["concepts"] != results[1]["concepts"]  # the ranks really hold different token counts

    reference_grads = []
    for rank in (0, 1):
        model = make_model(ep_size=1)
        ids = rank_input(rank)
        out = model(ids, labels=ids)
        out.loss.backward()
        torch.testing.assert_close(results[rank]["logits"], out.logits.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(results[rank]["qkv_grad"], model.body.inner.blocks[0].mixer.qkv.weight.grad,
                                   atol=1e-5, rtol=1e-4)
        reference_grads.append({(layer, e): expert_grad(model, layer, e) for layer in (0, 1) for e in range(4)})
    for rank in (0, 1):
        for (layer, local), grad in results[rank]["expert_grads"].items():
            expert = 2 * rank + local
            expected = reference_grads[0][(layer, expert)] + reference_grads[1][(layer, expert)]
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
