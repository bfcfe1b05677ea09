"""Single-process tests of the MoE feed-forward layer: routing math, losses, capacity, padding, precision, balancing."""

from __future__ import annotations

import math

import pytest
import torch

import synergy_dist.model.moe.gating as gating
import synergy_dist.model.moe.losses as losses
import synergy_dist.model.moe.statistics as moe_statistics
from synergy_dist.model.config import MoEConfig
from synergy_dist.model.moe.layer import (
    MoEFeedForward,
    dropless_routing,
    moe_param_groups,
    update_moe_biases,
)
from synergy_dist.model.precision import keep_fp32

D_MODEL, D_FF = 8, 16


def make_layer(**overrides) -> MoEFeedForward:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"n_experts": 4, "top_k": 2, **overrides})
    return MoEFeedForward(D_MODEL, D_FF, cfg)


def naive_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Per-token reference: y_t = sum over the top-k experts of gate * expert(x_t) (+ shared expert)."""
    experts = layer.local_experts.experts.deepspeed_experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t].float() @ layer.router.weight.float().t()
        probs = torch.softmax(logits, -1)
        top = torch.topk(probs, layer.cfg.top_k).indices
        weights = probs[top] / probs[top].sum()
        for w, e in zip(weights, top.tolist()):
            out[t] += w * experts[e](x[t : t + 1])[0]
        if layer.shared_mlp is not None:
            out[t] += layer.shared_mlp(x[t : t + 1])[0]
    return out


# ---------------------------------------------------------------- routing math


def test_softmax_top_k_gates_are_renormalised_probabilities():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 3.0, 0.5]])
    decision = gating.route_softmax(logits, top_k=2)
    assert decision.expert_ids.tolist() == [[0, 2], [1, 2]] or decision.expert_ids.tolist() == [[0, 2], [2, 1]]
    # token 0: softmax over logits {2, 1} = (e / (e + 1), 1 / (e + 1))
    e = math.e
    assert decision.gates[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], rel=1e-6)
    assert decision.gates[1].tolist() == pytest.approx([0.5, 0.5], rel=1e-6)
    full = torch.softmax(logits, -1)
    chosen = full.gather(1, decision.expert_ids)
    torch.testing.assert_close(decision.gates, chosen / chosen.sum(1, keepdim=True))
    torch.testing.assert_close(decision.probs, full)


def test_layer_output_equals_per_token_reference():
    layer = make_layer(shared_expert=True)
    x = torch.randn(3, 5, D_MODEL)
    y, stats = layer(x)
    torch.testing.assert_close(y.reshape(-1, D_MODEL), naive_moe(layer, x.reshape(-1, D_MODEL)), rtol=1e-5, atol=1e-6)
    assert stats.tokens_per_expert.sum().item() == 15 * 2


def test_aux_loss_matches_hand_computation():
    # 4 tokens, 3 experts, top-1. Logits chosen so the probabilities are easy to write down.
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    decision = gating.route_softmax(logits, top_k=1)
    counts = moe_statistics.expert_counts(decision.expert_ids, 3)
    assert counts.tolist() == [2.0, 1.0, 1.0]
    aux = losses.switch_aux_loss(decision.probs, counts, torch.tensor(4.0))
    f = [2 / 4, 1 / 4, 1 / 4]
    p = [(0.7 + 0.6 + 0.1 + 0.2) / 4, (0.2 + 0.3 + 0.8 + 0.2) / 4, (0.1 + 0.1 + 0.1 + 0.6) / 4]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p))
    assert aux.item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_is_one_under_perfect_balance_and_differentiable():
    logits = torch.zeros(6, 3, requires_grad=True)
    decision = gating.route_softmax(logits, top_k=1)
    aux = losses.switch_aux_loss(decision.probs, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64),
                                  torch.tensor(6.0))
    assert aux.item() == pytest.approx(1.0, rel=1e-6)
    aux.backward()
    assert logits.grad is not None


def test_z_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2 + math.log(4.0) ** 2) / 3
    assert losses.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert losses.router_z_loss(torch.zeros(0, 4)).item() == 0.0


def test_layer_losses_equal_routing_functions_on_its_logits():
    layer = make_layer()
    x = torch.randn(2, 6, D_MODEL)
    _, stats = layer(x)
    logits = x.reshape(-1, D_MODEL) @ layer.router.weight.t()
    decision = gating.route_softmax(logits, 2)
    counts = moe_statistics.expert_counts(decision.expert_ids, 4)
    assert stats.tokens_per_expert.tolist() == counts.tolist()
    assert stats.aux_loss.item() == pytest.approx(losses.switch_aux_loss(decision.probs, counts,
                                                                          torch.tensor(24.0)).item(), rel=1e-6)
    assert stats.z_loss.item() == pytest.approx(losses.router_z_loss(logits).item(), rel=1e-6)
    assert stats.router_logit_rms.item() == pytest.approx(logits.square().mean().sqrt().item(), rel=1e-5)
    fraction = counts / counts.sum()
    assert stats.load_entropy.item() == pytest.approx(-(fraction * fraction.log()).sum().item(), rel=1e-5)
    assert stats.max_over_mean_load.item() == pytest.approx((counts.max() / counts.mean()).item(), rel=1e-6)


# ---------------------------------------------------------------- capacity


def test_dead_experts_are_below_the_given_fraction_of_the_mean_load():
    assert moe_statistics.dead_experts(torch.tensor([100.0, 100.0, 1.0, 99.0]), 0.05) == [2]
    assert moe_statistics.dead_experts([100.0, 100.0, 10.0, 90.0], 0.05) == []
    assert moe_statistics.dead_experts([100.0, 100.0, 10.0, 90.0], 0.2) == [2]
    assert moe_statistics.dead_experts([0.0, 0.0], 0.1) == []  # nothing routed: no verdict


def test_layer_loss_applies_its_own_coefficients():
    layer = make_layer(aux_loss_coef=0.5, z_loss_coef=0.25)
    _, stats = layer(torch.randn(2, 6, D_MODEL))
    torch.testing.assert_close(stats.loss, 0.5 * stats.aux_loss + 0.25 * stats.z_loss)


def test_aux_loss_default_follows_the_scoring():
    assert MoEConfig().aux_loss_weight == 0.01  # Switch / ST-MoE
    assert MoEConfig(scoring="sigmoid_bias").aux_loss_weight == 1e-4  # DeepSeek-V3's complementary loss
    assert MoEConfig(scoring="sigmoid_bias", aux_loss_coef=0.0).aux_loss_weight == 0.0  # an explicit value wins
    layer = make_layer(scoring="sigmoid_bias", z_loss_coef=0.0)
    _, stats = layer(torch.randn(2, 6, D_MODEL))
    torch.testing.assert_close(stats.loss, 1e-4 * stats.aux_loss)


def test_sequence_balance_loss_follows_deepseek_v3_per_sequence():
    """Eq. 17-20 of DeepSeek-V3 written out with loops, on sequences of different lengths; and a batch that is
    balanced as a whole while each sequence sends everything to one expert scores 1 under the Switch loss but
    E under the sequence-wise one."""
    torch.manual_seed(0)
    n_experts, top_k = 4, 2
    sequence_of = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2])  # sequence 1 holds no token (all padding)
    probs = torch.softmax(torch.randn(8, n_experts), dim=-1).requires_grad_(True)
    expert_ids = torch.randint(0, n_experts, (8, top_k))
    loss = losses.sequence_balance_loss(probs, expert_ids, sequence_of, n_sequences=3)
    expected = []
    for s in (0, 2):
        rows = (sequence_of == s).nonzero().squeeze(1)
        total = 0.0
        for i in range(n_experts):
            f_i = n_experts / (top_k * len(rows)) * int((expert_ids[rows] == i).sum())
            total += f_i * probs[rows, i].mean()
        expected.append(total)
    torch.testing.assert_close(loss, sum(expected) / 2)
    loss.backward()  # differentiable through the probabilities
    assert probs.grad is not None and probs.grad.abs().sum() > 0

    one_hot = torch.eye(2)[[0, 0, 1, 1]]  # sequence 0 -> expert 0, sequence 1 -> expert 1
    ids = one_hot.argmax(dim=1, keepdim=True)
    per_batch = losses.switch_aux_loss(one_hot, torch.tensor([2.0, 2.0]), torch.tensor(4.0))
    per_sequence = losses.sequence_balance_loss(one_hot, ids, torch.tensor([0, 0, 1, 1]), n_sequences=2)
    assert per_batch.item() == pytest.approx(1.0) and per_sequence.item() == pytest.approx(2.0)


def test_sigmoid_bias_layers_use_the_sequence_wise_loss():
    layer = make_layer(scoring="sigmoid_bias")
    x = torch.randn(3, 5, D_MODEL)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1, 2:] = False
    _, stats = layer(x, valid)
    tokens = x[valid]
    decision = gating.route_sigmoid_bias(layer.router(tokens), layer.cfg.top_k, layer.selection_bias)
    sequence_of = valid.reshape(-1).nonzero().squeeze(1) // 5
    expected = losses.sequence_balance_loss(decision.probs, decision.expert_ids, sequence_of, n_sequences=3)
    torch.testing.assert_close(stats.aux_loss, expected)


def test_eval_routes_dropless_unless_an_eval_capacity_is_set():
    x = torch.rand(1, 8, D_MODEL) + 0.1
    layer = make_layer(top_k=1, dropless=False, capacity_factor_train=1.0, min_capacity=0)
    force_all_tokens_to_expert_zero(layer)
    assert layer.train()(x)[1].dropped_fraction.item() > 0
    y_eval, stats = layer.eval()(x)
    assert stats.dropped_fraction.item() == 0.0
    with dropless_routing(layer):  # what a forward with a cache does, whatever the mode
        y_train, stats = layer.train()(x)
    assert stats.dropped_fraction.item() == 0.0 and not layer.route_dropless
    torch.testing.assert_close(y_train, y_eval)


def test_capacity_mask_prefers_first_choices_then_token_order():
    expert_ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])
    keep = gating.capacity_keep_mask(expert_ids, n_experts=3, capacity=2)
    # expert 0: first choices of tokens 0, 1, 3 -> tokens 0 and 1 fit; second choice of token 2 is dropped too.
    # expert 1: first choice of token 2, then second choices of tokens 0, 1 -> token 0 fits, token 1 dropped.
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, True]]


def test_expert_capacity_formula():
    assert gating.expert_capacity(100, 2, 8, 1.25, 4) == math.ceil(1.25 * 100 * 2 / 8)
    assert gating.expert_capacity(3, 1, 8, 1.0, 4) == 4


def force_all_tokens_to_expert_zero(layer: MoEFeedForward) -> None:
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 10.0  # with positive inputs every token prefers expert 0


def test_dropless_routes_everything_and_capacity_drops_overflow():
    x = torch.rand(1, 8, D_MODEL) + 0.1
    dropless = make_layer(top_k=1, dropless=True)
    force_all_tokens_to_expert_zero(dropless)
    _, stats = dropless(x)
    assert stats.dropped_fraction.item() == 0.0
    assert stats.tokens_per_expert.tolist() == [8.0, 0.0, 0.0, 0.0]

    capped = make_layer(top_k=1, dropless=False, capacity_factor_train=1.0, capacity_factor_eval=3.0, min_capacity=0)
    force_all_tokens_to_expert_zero(capped)
    capped.train()
    y, stats = capped(x)
    # capacity = ceil(1.0 * 8 * 1 / 4) = 2: tokens 0 and 1 are processed, the other 6 dropped (output 0)
    assert stats.dropped_fraction.item() == pytest.approx(6 / 8)
    assert y[0, :2].abs().sum() > 0 and torch.all(y[0, 2:] == 0)
    assert stats.tokens_per_expert.tolist() == [8.0, 0.0, 0.0, 0.0]  # routed demand, before dropping
    capped.eval()
    _, stats = capped(x)  # eval factor 3.0 -> capacity 6
    assert stats.dropped_fraction.item() == pytest.approx(2 / 8)


# ---------------------------------------------------------------- padding


def test_padding_tokens_are_not_routed_and_get_zero():
    layer = make_layer(shared_expert=True)
    x = torch.randn(2, 5, D_MODEL)
    valid = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    x_garbage = x.clone()
    x_garbage[~valid] = 1e4  # padding content must not matter
    x_garbage.requires_grad_(True)
    y, stats = layer(x_garbage, valid)
    assert torch.all(y[~valid] == 0)
    packed = x[valid].unsqueeze(0)
    y_packed, stats_packed = layer(packed)
    torch.testing.assert_close(y[valid], y_packed[0])
    assert stats.tokens_per_expert.tolist() == stats_packed.tokens_per_expert.tolist()
    assert stats.tokens_per_expert.sum().item() == 6 * 2
    assert stats.z_loss.item() == pytest.approx(stats_packed.z_loss.item(), rel=1e-6)
    (y.sum() + stats.aux_loss + stats.z_loss).backward()
    assert torch.all(x_garbage.grad[~valid] == 0)
    assert x_garbage.grad[valid].abs().sum() > 0


def test_all_padding_gives_zero_output_and_finite_stats():
    layer = make_layer()
    x = torch.randn(2, 3, D_MODEL, requires_grad=True)
    y, stats = layer(x, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(y == 0)
    for value in (stats.aux_loss, stats.z_loss, stats.dropped_fraction, stats.load_entropy,
                  stats.max_over_mean_load, stats.router_logit_rms):
        assert torch.isfinite(value).all() and value.item() == 0.0
    (y.sum() + stats.aux_loss + stats.z_loss).backward()  # the graph exists even with no token


def test_bad_inputs_fail_with_clear_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"expects x of shape \(B, T, 8\)"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        layer(torch.randn(2, 3, D_MODEL), torch.ones(2, 3))


# ---------------------------------------------------------------- precision


def test_router_runs_in_fp32_under_bf16_autocast():
    layer = make_layer()
    x = torch.randn(2, 4, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = layer(x)
    assert layer.router.weight.dtype == torch.float32
    assert y.dtype == torch.bfloat16  # the experts do run in bf16
    logits = x.reshape(-1, D_MODEL) @ layer.router.weight.t()  # fp32 reference
    assert stats.z_loss.dtype == torch.float32
    assert stats.z_loss.item() == pytest.approx(losses.router_z_loss(logits).item(), rel=1e-6)


def test_bf16_parameters_are_rejected_until_router_is_fp32_again():
    layer = make_layer().to(torch.bfloat16)
    x = torch.randn(1, 4, D_MODEL, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="MoE router weight is torch.bfloat16, it must stay torch.float32"):
        layer(x)
    assert keep_fp32(layer) == 1
    assert layer.selection_bias.dtype == torch.float32 and layer.load_since_update.dtype == torch.float64
    y, stats = layer(x)
    assert y.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.float32
    logits = x.reshape(-1, D_MODEL).float() @ layer.router.weight.t()
    assert stats.z_loss.item() == pytest.approx(losses.router_z_loss(logits).item(), rel=1e-6)


# ---------------------------------------------------------------- sigmoid_bias balancing


def test_sigmoid_gates_use_unbiased_scores():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    decision = gating.route_sigmoid_bias(logits, 1, torch.tensor([5.0, 0.0, 0.0]))
    assert decision.expert_ids.tolist() == [[0]]  # the bias decided the winner...
    assert decision.gates.tolist() == [[1.0]]  # ...but not the weight (renormalised unbiased score)
    decision = gating.route_sigmoid_bias(logits, 2, torch.tensor([5.0, 0.0, 0.0]))
    s = torch.sigmoid(logits)[0]
    assert decision.expert_ids.tolist() == [[0, 2]]
    assert decision.gates[0].tolist() == pytest.approx([(s[0] / (s[0] + s[2])).item(),
                                                        (s[2] / (s[0] + s[2])).item()], rel=1e-6)


def test_sigmoid_bias_moves_towards_balance():
    rate = 0.05
    layer = make_layer(scoring="sigmoid_bias", top_k=1, bias_update_rate=rate)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1)
        layer.router.weight[0] += 1.5  # expert 0 is everybody's favourite
    layer.train()
    x = torch.rand(4, 16, D_MODEL) + 0.1
    _, first = layer(x)
    load = first.tokens_per_expert.double()
    assert update_moe_biases(layer) == 1
    expected = rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.selection_bias, expected.float())
    assert layer.load_since_update.sum().item() == 0  # accumulator reset each optimizer step
    for _ in range(60):
        layer(x)
        layer.update_bias()
    _, last = layer(x)
    assert last.max_over_mean_load < first.max_over_mean_load
    assert last.load_entropy > first.load_entropy
    assert layer.selection_bias[0] < 0  # the overloaded expert is pushed down
    assert "selection_bias" in layer.state_dict() and "load_since_update" not in layer.state_dict()


def test_softmax_scoring_never_moves_the_bias():
    layer = make_layer()
    layer.train()
    layer(torch.randn(2, 8, D_MODEL))
    layer.update_bias()
    assert torch.all(layer.selection_bias == 0)


def test_jitter_only_in_training():
    layer = make_layer(jitter=0.5)
    x = torch.randn(2, 8, D_MODEL)
    layer.eval()
    torch.testing.assert_close(layer(x)[1].z_loss, layer(x)[1].z_loss)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)[1].router_logit_rms
    torch.manual_seed(2)
    b = layer(x)[1].router_logit_rms
    assert a.item() != b.item()


# ---------------------------------------------------------------- config and optimizer groups


@pytest.mark.parametrize("overrides, message", [
    ({"top_k": 9}, "moe.top_k=9 must be between 1 and moe.n_experts=8"),
    ({"scoring": "cosine"}, "moe.scoring='cosine' is unknown: use one of softmax, sigmoid_bias"),
    ({"expert_parallel_size": 3}, "moe.expert_parallel_size=3 must divide moe.n_experts=8"),
    ({"dropless": False, "capacity_factor_train": 0.0}, "moe.capacity_factor_train=0.0 must be > 0"),
    ({"jitter": 1.5}, "moe.jitter=1.5 must be < 1"),
])
def test_bad_config_fails_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEFeedForward(D_MODEL, D_FF, MoEConfig(**overrides))


def test_ep_greater_than_one_needs_distributed():
    with pytest.raises(RuntimeError, match="expert_parallel_size=2 needs torch.distributed"):
        MoEFeedForward(D_MODEL, D_FF, MoEConfig(expert_parallel_size=2))


def test_moe_param_groups_split_expert_parameters():
    layer = make_layer(shared_expert=True)
    model = torch.nn.Sequential(torch.nn.Linear(D_MODEL, D_MODEL), layer)
    expert_params = list(layer.local_experts.parameters())
    assert all(p.allreduce is False and p.group_name == "ep_size_1" for p in expert_params)
    groups = moe_param_groups([{"params": list(model.parameters()), "lr": 0.5, "name": "middle"}])
    assert [g["name"] for g in groups] == ["middle", "ep_size_1"]
    dense, experts = groups
    assert experts["moe"] is True and experts["lr"] == 0.5 and "moe" not in dense
    assert {id(p) for p in experts["params"]} == {id(p) for p in expert_params}
    assert len(dense["params"]) == len(list(model.parameters())) - len(expert_params)
    from deepspeed.moe.utils import is_moe_param_group
    assert [is_moe_param_group(g) for g in moe_param_groups(model)] == [False, True]


# ---------------------------------------------------------------- resharding between expert-parallel sizes


def test_shard_then_consolidate_is_identity_and_renumbers_experts():
    from synergy_dist.checkpoint.expert_layout import consolidate_expert_states, shard_expert_state

    model = torch.nn.Sequential(torch.nn.Linear(D_MODEL, D_MODEL), make_layer(shared_expert=True))
    full = model.state_dict()
    shards = [shard_expert_state(full, 2, rank) for rank in range(2)]
    prefix = "1.deepspeed_moe.experts.deepspeed_experts."
    assert sorted(k for k in shards[1] if k.startswith(prefix)) == sorted(
        f"{prefix}{i}.{w}" for i in range(2) for w in ("w_gate", "w_up", "w_down"))
    assert torch.equal(shards[1][f"{prefix}0.w_up"], full[f"{prefix}2.w_up"])  # rank 1's first = global 2
    assert torch.equal(shards[0]["1.router.weight"], full["1.router.weight"])
    merged = consolidate_expert_states(shards)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_resharding_errors_name_the_problem():
    from synergy_dist.checkpoint.expert_layout import consolidate_expert_states, shard_expert_state

    full = make_layer().state_dict()  # 4 experts
    with pytest.raises(ValueError, match="4 experts under 'deepspeed_moe.experts.deepspeed_experts.' cannot be "
                                         "split over expert_parallel_size=3"):
        shard_expert_state(full, 3, 0)
    with pytest.raises(ValueError, match=r"ep_rank=2 must be in \[0, ep_size=2\)"):
        shard_expert_state(full, 2, 2)
    broken = {k: v for k, v in full.items() if ".deepspeed_experts.1." not in k}
    with pytest.raises(ValueError, match=r"expert ids under .* are \[0, 2, 3\], expected 0..2"):
        shard_expert_state(broken, 2, 0)
    with pytest.raises(ValueError, match="rank 1 holds"):
        consolidate_expert_states([shard_expert_state(full, 2, 0), shard_expert_state(full, 4, 0)])
