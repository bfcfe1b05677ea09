"""Expert parallelism on 2 real gloo ranks: ep=2 equals ep=1 (outputs, gradients, statistics) with uneven token
counts, a rank with no valid token, capacity dropping and sigmoid_bias scoring; every rank enters every
collective the same number of times."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from two_ranks import run_on_two_ranks

D_MODEL, D_FF, N_EXPERTS = 8, 12, 4

# (name, MoEConfig overrides, valid tokens per rank as (batch, length, n_valid) pairs, rank 1 input needs grad)
CASES = [
    ("dropless_uneven", {"shared_expert": True}, [(2, 7, 11), (1, 3, 2)], True),
    ("rank1_empty", {}, [(2, 5, 9), (1, 4, 0)], False),
    ("capacity_dropping", {"dropless": False, "capacity_factor_train": 1.0, "capacity_factor_eval": 1.0,
                           "min_capacity": 0}, [(2, 6, 10), (1, 5, 5)], True),
    ("sigmoid_bias_top1", {"scoring": "sigmoid_bias", "top_k": 1}, [(1, 9, 9), (2, 3, 4)], True),
]
COUNTED = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
           "reduce_scatter_tensor", "send", "recv", "barrier")
# per case: forward (train) + backward + one no-grad eval forward
EXPECTED_COLLECTIVES = Counter({"all_to_all_single": 3 + 2 + 3, "all_reduce": 1})


def make_inputs(rank: int, shape: tuple[int, int, int]):
    batch, length, n_valid = shape
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(batch, length, D_MODEL, generator=generator)
    valid = torch.zeros(batch * length, dtype=torch.bool)
    valid[torch.randperm(batch * length, generator=generator)[:n_valid]] = True
    weight = torch.randn(batch, length, D_MODEL, generator=generator)
    return x, valid.view(batch, length), weight


class CollectiveCounter:
    """Counts calls of torch.distributed collectives while active (patched on the module, as our code calls them)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.originals = {}

    def __enter__(self):
        for name in COUNTED:
            original = getattr(dist, name)
            self.originals[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


def run_case(rank: int, overrides: dict, shapes, rank1_grad: bool) -> None:
    import synergy_dist.model.moe.gating as gating
    import synergy_dist.model.moe.losses as losses
    from synergy_dist.checkpoint.expert_layout import consolidate_expert_states, shard_expert_state
    from synergy_dist.model.config import MoEConfig
    from synergy_dist.model.moe.layer import MoEFeedForward

    cfg = MoEConfig(**{"n_experts": N_EXPERTS, "top_k": 2, "expert_parallel_size": 2, **overrides})
    torch.manual_seed(0)
    layer = MoEFeedForward(D_MODEL, D_FF, cfg)
    torch.manual_seed(0)
    reference = MoEFeedForward(D_MODEL, D_FF, replace(cfg, expert_parallel_size=1))
    if cfg.scoring == "sigmoid_bias":
        bias = torch.tensor([0.3, -0.2, 0.0, 0.1])
        layer.selection_bias.copy_(bias)
        reference.selection_bias.copy_(bias)

    # expert initialisation does not depend on the expert-parallel size
    ref_experts = reference.local_experts.experts.deepspeed_experts
    for local_id, expert in enumerate(layer.local_experts.experts.deepspeed_experts):
        for (name, p), p_ref in zip(expert.named_parameters(), ref_experts[rank * 2 + local_id].parameters()):
            assert torch.equal(p, p_ref), name
    assert torch.equal(layer.router.weight, reference.router.weight)

    # the per-rank states consolidate into the ep=1 state, and the ep=1 state shards into each rank's
    states = [None, None]
    dist.all_gather_object(states, layer.state_dict())
    full = reference.state_dict()
    merged = consolidate_expert_states(states)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    layer.load_state_dict(shard_expert_state(full, 2, rank), strict=True)

    inputs = [make_inputs(r, shapes[r]) for r in range(2)]
    x, valid, weight = inputs[rank]
    x = x.clone().requires_grad_(rank == 0 or rank1_grad)
    layer.train()
    with CollectiveCounter() as counter:
        y, stats = layer(x, valid)
        loss = (y * weight).sum() + stats.z_loss + 0.1 * stats.aux_loss
        loss.backward()
        layer.eval()
        other_shape = (1, 2 + 3 * rank, 1 + rank)  # eval forward with yet other token counts
        with torch.no_grad():
            layer(*make_inputs(rank, other_shape)[:2])

    gathered = [None, None]
    dist.all_gather_object(gathered, dict(counter.counts))
    assert gathered[0] == gathered[1], f"ranks entered collectives differently: {gathered}"
    assert Counter(gathered[rank]) == EXPECTED_COLLECTIVES, gathered[rank]

    # the bias update uses the global counts, so every rank moves its bias identically
    bias_before = layer.selection_bias.clone()
    layer.update_bias()
    biases = [None, None]
    dist.all_gather_object(biases, layer.selection_bias)
    assert torch.equal(biases[0], biases[1])
    if cfg.scoring == "sigmoid_bias":
        load = stats.tokens_per_expert.double()
        expected = bias_before + cfg.bias_update_rate * torch.sign(load.mean() - load).float()
        torch.testing.assert_close(layer.selection_bias, expected)
        layer.selection_bias.copy_(bias_before)  # the reference below routes with the forward's bias

    # single-process reference on both ranks' inputs (eval: no collectives; capacity factors are equal)
    reference.eval()
    ref_out, ref_stats, ref_x, probs = [], [], [], []
    for r in range(2):
        xr, vr, _ = inputs[r]
        xr = xr.clone().requires_grad_(True)
        out, st = reference(xr, vr)
        ref_out.append(out)
        ref_stats.append(st)
        ref_x.append(xr)
        logits = reference.router(xr[vr])
        if cfg.scoring == "softmax":
            probs.append(gating.route_softmax(logits, cfg.top_k).probs)
        else:
            probs.append(gating.route_sigmoid_bias(logits, cfg.top_k, reference.selection_bias).probs)
    global_counts = ref_stats[0].tokens_per_expert.double() + ref_stats[1].tokens_per_expert.double()
    n_assign = torch.tensor(float((shapes[0][2] + shapes[1][2]) * cfg.top_k), dtype=torch.float64)
    if cfg.scoring == "sigmoid_bias":  # sequence-wise: each rank's loss is its own sequences', as in one process
        ref_aux = [ref_stats[r].aux_loss for r in range(2)]
    else:
        ref_aux = [losses.switch_aux_loss(probs[r], global_counts, n_assign) for r in range(2)]
    ref_loss = sum((ref_out[r] * inputs[r][2]).sum() + ref_stats[r].z_loss + 0.1 * ref_aux[r] for r in range(2))
    ref_loss.backward()

    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y, ref_out[rank], **tol)
    assert torch.all(y[~valid] == 0)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, ref_x[rank].grad, **tol)
    torch.testing.assert_close(stats.tokens_per_expert.double(), global_counts)
    assert stats.aux_loss.item() == pytest.approx(ref_aux[rank].item(), rel=1e-5)
    assert stats.z_loss.item() == pytest.approx(ref_stats[rank].z_loss.item(), rel=1e-5, abs=1e-7)
    dropped = sum(ref_stats[r].dropped_fraction.item() * shapes[r][2] * cfg.top_k for r in range(2))
    assert stats.dropped_fraction.item() == pytest.approx(dropped / n_assign.item(), abs=1e-6)
    if not cfg.dropless:
        assert dropped > 0, "the capacity case must actually drop tokens"

    for local_id, expert in enumerate(layer.local_experts.experts.deepspeed_experts):
        for (name, p), p_ref in zip(expert.named_parameters(), ref_experts[rank * 2 + local_id].parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=f"expert {rank * 2 + local_id} {name}")
    # replicated parameters: each rank holds the gradient of its own tokens; the sum is the reference
    replicated = [(layer.router.weight, reference.router.weight)]
    if layer.shared_mlp is not None:
        replicated += list(zip(layer.shared_mlp.parameters(), reference.shared_mlp.parameters()))
    for p, p_ref in replicated:
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_ref.grad, **tol)


def _two_rank_body(rank: int) -> None:
    for name, overrides, shapes, rank1_grad in CASES:
        try:
            run_case(rank, overrides, shapes, rank1_grad)
        except Exception as error:
            raise AssertionError(f"case {name} failed on rank {rank}") from error


def test_expert_parallel_2_equals_1_with_uneven_tokens(tmp_path):
    run_on_two_ranks(_two_rank_body, tmp_path)
