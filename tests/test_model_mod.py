"""Mixture-of-Depths (model/mod.py): top-k routing processes exactly ceil(capacity x valid) positions per row and
costs that in FLOPs; predictor mode is causal, generates from a cache exactly as it recomputes, and keeps packed
documents apart; gradients reach the router and the predictor; MoD and MoDE models train and resume exactly."""

import math
from pathlib import Path

import pytest
import torch
import train_launch as tl
from model_configs import tiny_test_config, yaml_model_config
from test_host_sync import step_sites
from test_model_isolation import assert_same, windows

from benchmarks.quality_rows import model_config, reference_flops_per_byte
from data_pipeline.vocab import EOD_ID, PAD_ID
from synergy_dist.model.accounting import flops_breakdown, flops_per_byte
from synergy_dist.model.config import ModelConfig, MoEConfig, StackConfig, mlp_hidden
from synergy_dist.model.synergy import SynergyLM

CAPACITY = 0.3


def mod_model(capacity: float = CAPACITY, stages: bool = True, moe: bool = False, coef: float = 0.01,
              dtype=torch.float64) -> SynergyLM:
    """A tiny model whose middle has two attention layers, both routed (every=1); large init std (varied routing)."""
    torch.manual_seed(0)
    mod = {"capacity": capacity, "every": 1, "predictor_loss_coef": coef}
    if stages:
        cfg = tiny_test_config("cosine", "MA", "AA")
        cfg.middle.mod = mod
    else:
        cfg = ModelConfig(stages=[], d_middle=32, middle=StackConfig(pattern="A", repeat=2, n_heads=2, mlp_ratio=2.0,
                                                                     mod=mod))
    cfg.middle.__post_init__()
    if moe:
        cfg.middle.moe_every = 1
        cfg.middle.moe = MoEConfig(n_experts=4, top_k=2, dropless=True)
    cfg.init_std = 0.2
    cfg.validate()
    model = SynergyLM(cfg)
    return model if moe else model.to(dtype)


def processed_rows(model: SynergyLM) -> list[list[torch.Tensor]]:
    """Record, per call of each routed block, which slots of each row went through it (kept, (B, K) bool)."""
    calls = []
    for block in model.modules():
        if getattr(block, "depth_router", None) is not None:
            inner = block._delta

            def spy(x, valid, cache, seq_idx, inner=inner):
                calls.append(valid.clone())
                return inner(x, valid, cache, seq_idx)
            block._delta = spy
    return calls


@pytest.mark.parametrize("moe", [False, True], ids=["mod", "mode"])
def test_top_k_processes_ceil_capacity_of_each_rows_valid_positions_and_flops_follow(moe):
    model = mod_model(stages=False, moe=moe).train()
    lengths = [40, 33, 17]  # valid positions per row; the rest is padding, never selected
    ids = torch.randint(0, 256, (3, 40))
    for row, n in enumerate(lengths):
        ids[row, n:] = PAD_ID
    calls = processed_rows(model)
    out = model(ids)
    expected = [math.ceil(CAPACITY * n) for n in lengths]  # 12, 10, 6
    assert len(calls) == 2
    for kept in calls:
        assert kept.sum(dim=1).tolist() == expected
    for name in ("middle.0", "middle.1"):
        fraction = out.stats.mod[name].processed_fraction.item()
        assert fraction == pytest.approx(sum(expected) / sum(lengths), abs=1e-6)
        if moe:  # MoDE: the MoE layer of a routed block routes its selected positions only, top_k experts each
            assert out.stats.moe[name].tokens_per_expert.sum().item() == 2 * sum(expected)

    # FLOPs: a routed layer costs capacity x (its projections + MLP + attention among ceil(capacity x L) positions)
    # plus its router (d) and predictor (d -> d/4 -> 1) on every position
    cfg, seq_len, d = model.cfg, 40, 32
    dense_cfg = ModelConfig(stages=[], d_middle=d, middle=StackConfig(pattern="A", repeat=2, n_heads=2,
                                                                      mlp_ratio=2.0, moe_every=cfg.middle.moe_every,
                                                                      moe=cfg.middle.moe))
    ffn = (2 * d * 4 + 2 * 2 * 3 * d * mlp_hidden(d, 2.0)) if moe else 2 * 3 * d * mlp_hidden(d, 2.0)

    def layer(n):
        return 2 * 4 * d * d + 2 * 2 * (n + 1) / 2 * d + ffn

    routed = CAPACITY * layer(math.ceil(CAPACITY * seq_len)) + 2 * d + 2 * (d * (d // 4) + d // 4)
    assert flops_breakdown(dense_cfg, seq_len)["middle"] == pytest.approx(2 * layer(seq_len))
    assert flops_breakdown(cfg, seq_len)["middle"] == pytest.approx(2 * routed)
    assert flops_per_byte(dense_cfg, seq_len) - flops_per_byte(cfg, seq_len) == pytest.approx(
        3 * 2 * (layer(seq_len) - routed))


def test_predictor_mode_is_causal_and_top_k_mode_is_not():
    model = mod_model()
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 64))
    changed = ids.clone()
    changed[:, 40:] = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        model.eval()
        a, b = model(ids), model(changed)
        assert_same(a.logits[:, :40], b.logits[:, :40], 1e-9)
        assert 0.1 < a.stats.mod["middle.0"].processed_fraction.item() < 0.9  # the predictor does skip positions
        model.train()  # top-k over the whole row: later bytes change which earlier positions are processed
        assert (model(ids).logits[:, :40] - model(changed).logits[:, :40]).abs().max().item() > 1e-6
        for block in model.body.inner.blocks:  # mod.predictor_in_training: training routes causally too
            block.depth_router.cfg.predictor_in_training = True
        assert_same(model(ids).logits[:, :40], model(changed).logits[:, :40], 1e-9)


def test_cached_generation_equals_recomputation_in_predictor_mode():
    model = mod_model(dtype=torch.float32).eval()
    prompt = b"def mixture(depths):"
    generated = model.generate(prompt, 24, temperature=0)
    ids = torch.tensor([[EOD_ID, *prompt, *generated]])  # what generation reads: EOD + prompt + continuation
    with torch.no_grad():
        full = model(ids).logits[0]
        assert bytes(full[len(prompt):-1, :256].argmax(dim=-1).tolist()) == generated  # greedy from recomputation
        cache = model.new_cache()
        pieces = [model._run(ids[:, :7], cache)[0]] + [model._run(ids[:, t:t + 1], cache)[0]
                                                       for t in range(7, ids.shape[1])]
        assert_same(torch.cat(pieces, dim=1)[0], full, 1e-5)
    # rows of different lengths generate in one batch exactly as alone (a skipped position enters no cache)
    other = b"x = 1"
    assert model.generate([prompt, other], 24, temperature=0) == [generated, model.generate(other, 24, temperature=0)]


def test_documents_stay_isolated_in_predictor_mode():
    model = mod_model().eval()
    packed, alone, start = windows()
    with torch.no_grad():
        reference = model(alone).logits[0]
        assert_same(model(packed).logits[0, start:], reference, 1e-9)
        cache = model.new_cache()
        pieces = [model._run(packed[:, :start + 5], cache)[0]] + [model._run(packed[:, t:t + 1], cache)[0]
                                                                  for t in range(start + 5, packed.shape[1])]
        assert_same(torch.cat(pieces, dim=1)[0, start:], reference, 1e-9)


def test_a_mod_training_step_adds_no_host_synchronisation():
    """Top-k sizes come from the shapes (test_host_sync.py counts the dense model's synchronisations)."""
    cfg = yaml_model_config("tiny-cpu")
    dense = step_sites(cfg)
    cfg.middle.repeat, cfg.middle.mod = 4, {"capacity": 0.5, "every": 2}
    cfg.middle.__post_init__()
    sites = step_sites(cfg)
    assert set(sites) <= set(dense) and all(sites[s] <= dense[s] for s in sites), (sites, dense)


def test_gradients_reach_the_router_from_the_loss_and_the_predictor_only_from_its_own_loss():
    ids = torch.randint(0, 256, (2, 48))
    for coef in (0.0, 0.01):
        model = mod_model(coef=coef).train()
        model(ids, ids).loss.backward()
        router = model.body.inner.blocks[0].depth_router
        assert router.router.weight.grad.abs().max().item() > 0
        predictor = max(p.grad.abs().max().item() for p in router.predictor.parameters())
        assert (predictor > 0) == (coef > 0)  # the predictor reads a stop-gradient input: no other path


@pytest.mark.parametrize("mod,message", [
    ({"capacity": 1.5}, "model.middle.mod.capacity=1.5 must be in (0, 1]"),
    ({"capacity": -0.5}, "model.middle.mod.capacity=-0.5 must be in (0, 1]"),
    ({"capacity": 0.5, "every": 0}, "model.middle.mod.every=0 must be >= 1"),
    ({"capacity": 0.5, "predictor_loss_coef": -1}, "model.middle.mod.predictor_loss_coef=-1 must be >= 0"),
    ({"capacity": 0.5, "every": 1}, "model.middle.mod routes layer 1, a Mamba ('M') layer"),
    ({"capacity": 0.5, "depth": 2}, "unknown ModConfig keys ['depth']"),
])
def test_bad_values_give_one_line_naming_the_key(mod, message):
    with pytest.raises(ValueError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")) as err:
        ModelConfig(middle={"pattern": "AM", "pos_encoding": "none", "mod": mod})
    assert "\n" not in str(err.value)


def test_the_quality_rows_mod_row_routes_every_second_layer_at_row_ones_flops():
    cfg = model_config("synergy-mod-middle", 512)
    assert cfg.middle.mod_layer_indices() == [1, 3] and cfg.middle.mod.capacity == 0.5
    assert flops_per_byte(cfg, 512) == pytest.approx(reference_flops_per_byte(512), rel=0.01)


@pytest.mark.slow
def test_a_mode_run_trains_logs_mod_statistics_and_resumes_exactly(tmp_path):
    """MoDE: middle layer 0 is an MoE layer, layer 1 an MoE layer routed by MoD (capacity 0.5). Killed after step 3
    (checkpoint at step 2), the run resumes and computes step 3 again bitwise as it did before the kill."""
    cfg = tl.tiny_config(tmp_path / "run", tmp_path / "sample", train={"max_steps": 4, "lr": 3e-3, "sample_bytes": 0})
    cfg["model"]["middle"] = dict(tl.TINY_MOE_MIDDLE, mod={"capacity": 0.5, "every": 2})
    proc = tl.start(cfg, "single", 1, ["debug.hang_after_step=3"])
    tl.wait_for_step(proc, cfg, 3)
    tl.kill_group(proc)
    before = tl.metrics(cfg)
    assert tl.run(cfg) == 0, tl.output_of(cfg)[-4000:]
    assert "resumed from " + str(Path(cfg["run"]["dir"]) / "checkpoints" / "step_00000002") in tl.output_of(cfg)
    after = tl.metrics(cfg)[len(before):]
    assert [r["step"] for r in after] == [3, 4]
    computed = [r for r in before if r["step"] == 3][0]
    keys = [k for k in computed if k in ("loss", "grad_norm", "lr") or k.startswith(("mod/", "moe/", "stage0/"))]
    assert "mod/middle.1/predictor_loss" in keys and "moe/middle.1/tokens_per_expert" in keys
    assert {k: after[0][k] for k in keys} == {k: computed[k] for k in keys}  # bitwise: floats compare exactly
    logged = before + after
    assert all(0.5 <= r["mod/middle.1/processed_fraction"] <= 1 for r in logged)
    assert all(0 <= r["mod/middle.1/predictor_accuracy"] <= 1 for r in logged)
