"""synergy-plan: parameter counts, memory per GPU and FLOPs per byte of every config, built on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synergy_dist.cli.plan import main as plan_main
from synergy_dist.config import load_config
from synergy_dist.model.synergy import SynergyLM
from synergy_dist.plan import GiB, PlanError, activation_bytes, make_plan, parse_memory

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_plans_and_its_state_memory_follows_zero(path):
    cfg = load_config(path)
    gpus = 8 * cfg.deepspeed.expert_parallel_size
    plans = {}
    for stage in (0, 1, 2, 3):
        if stage == 3 and cfg.model.middle.moe_layer_indices():
            continue  # DeepSpeed refuses native MoE under ZeRO-3
        plans[stage] = make_plan(load_config(path, [f"deepspeed.zero_stage={stage}"]), gpus, 80 * GiB)
    p0 = plans[0]
    assert p0.params_total >= p0.params_active > 0
    assert p0.memory_total == pytest.approx(sum(p0.memory.values()))
    # each stage partitions one more kind of state over the ranks, never adding any
    assert plans[1].memory["optimizer"] < p0.memory["optimizer"]
    assert plans[2].memory["gradients"] < plans[1].memory["gradients"] == p0.memory["gradients"]
    if 3 in plans:
        assert plans[3].memory["weights"] == pytest.approx(p0.memory["weights"] / gpus)
    assert make_plan(cfg, 2 * gpus, 80 * GiB).memory_total <= make_plan(cfg, gpus, 80 * GiB).memory_total
    assert p0.flops_per_byte_train == pytest.approx(3 * p0.flops_per_byte_forward)


@pytest.mark.parametrize("name", ["tiny-cpu", "tiny-moe-cpu"])
def test_meta_counts_equal_the_real_model(name):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    plan = make_plan(cfg, 2 * cfg.deepspeed.expert_parallel_size, 80 * GiB)
    cfg.model.middle.moe.expert_parallel_size = 1
    real = SynergyLM(cfg.model)
    assert plan.params_total == sum(p.numel() for p in real.parameters())
    # ZeRO-0 fp32 weights: every dense parameter and this rank's share of the experts, 4 bytes each
    zero0 = make_plan(load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml",
                                  ["deepspeed.zero_stage=0", "precision.dtype=fp32"]), 2 * plan.expert_parallel_size,
                      80 * GiB)
    dense = plan.params_total - plan.params_experts
    assert zero0.memory["weights"] == 4 * (dense + plan.params_experts / plan.expert_parallel_size)


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, list[float]]:
    """Bytes of the tensors autograd keeps for backward (parameters excluded, shared storages once), and the
    realised cumulative bytes per concept of each stage."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    return sum(kept.values()), [float(s.bytes_per_concept) for s in out.stats.stages]


@pytest.mark.parametrize("name", ["tiny-cpu", "tiny-moe-cpu"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "recomputed"])
def test_activation_estimate_matches_what_autograd_keeps(name, checkpointing):
    torch.manual_seed(0)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    cfg.model.middle.moe.expert_parallel_size = 1
    model = SynergyLM(cfg.model).train()
    model.set_activation_checkpointing(checkpointing)
    ids = torch.randint(0, 256, (2, cfg.data.seq_len))
    measured, bytes_per_concept = saved_activation_bytes(model, ids)
    estimate = activation_bytes(cfg.model, cfg.data.seq_len, 2, "fp32", checkpointing, bytes_per_concept,
                                working_set=False)
    assert 0.85 < estimate / measured < 1.15, (estimate, measured)


def test_cli_prints_the_plan_and_warns_when_it_does_not_fit(capsys, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "synergy-1b.yaml"
    assert plan_main([str(config), "--gpus", "8", "--gpu-memory", "80GiB", "--json", str(tmp_path / "p.json")]) == 0
    out, err = capsys.readouterr()
    assert "total 0.96 B" in out and "ZeRO-2" in out and "activations" in out and err == ""
    assert '"fits": true' in (tmp_path / "p.json").read_text()
    no_recompute = "deepspeed.activation_checkpointing=false"
    assert plan_main([str(config), "--gpus", "8", "--gpu-memory", "8GiB", no_recompute]) == 0
    err = capsys.readouterr().err
    assert "needs" in err and "per GPU but a GPU has 8.0 GiB" in err and "activation_checkpointing=true" in err


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "12"], "--gpus 12 is not a multiple of deepspeed.expert_parallel_size=8"),
    (["--gpus", "8", "--gpu-memory", "lots"], "--gpu-memory 'lots' is not a memory size"),
    (["--gpus", "8", "model.middle.repeat=0"], "model.middle"),
])
def test_cli_bad_input_is_one_line(capsys, argv, message):
    config = Path(__file__).resolve().parents[1] / "configs" / "moe-8b-a1b.yaml"
    assert plan_main([str(config), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_memory_sizes_parse():
    assert parse_memory("80GiB") == 80 * GiB
    assert parse_memory("141 GB") == 141e9
    with pytest.raises(PlanError):
        parse_memory("-3GiB")
