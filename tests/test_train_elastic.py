"""Elastic resume of an MoE model with expert parallelism, in real processes (gloo): 2 ranks with
expert_parallel_size 2 -> 1 rank (ep 1), and 1 rank -> 2 ranks (ep 2), under ZeRO-2 and ZeRO-0;
ZeRO-1 2 ranks ep 1 -> 1 rank (expert groups partitioned over two ranks when saved); and ZeRO-2
4 ranks ep 2 <-> 2 ranks ep 2 (expert groups partitioned over two expert-data-parallel ranks).

For each ZeRO stage, uninterrupted runs (one per geometry) train STEPS steps, checkpointing every 2.
A resumed run starts from one run's step-RESUME_AT checkpoint on the other geometry (through
tests/elastic_probe.py, which records what the resume restored) and trains to STEPS. Checked: every
expert's weights and Adam state (exp_avg, exp_avg_sq, step) land on the rank that now owns the expert,
equal to the saved tensors (read here straight from DeepSpeed's files); the data stream continues at the
same global position; the losses after the resume equal the uninterrupted run's on the new geometry.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import train_launch as tl
import yaml

pytestmark = pytest.mark.slow

STEPS = 6
RESUME_AT = 2
N_EXPERTS = tl.TINY_MOE_MIDDLE["moe"]["n_experts"]
MOE_LAYERS = 2  # the tiny middle: pattern "A" x 2, every block MoE
EXPERT_PARAMS = ("w_gate", "w_up", "w_down")  # in model order
GEOMETRIES = {"2ranks_ep2": (2, 2), "1rank_ep1": (1, 1), "2ranks_ep1": (2, 1),
              "4ranks_ep2": (4, 2)}  # (world size, expert-parallel size)
EXPERT_NAME = re.compile(r"^(?P<prefix>body\.inner\.blocks\.(?P<layer>\d+)\.ffn\.deepspeed_moe\.experts\."
                         r"deepspeed_experts\.)(?P<id>\d+)\.(?P<param>\w+)$")
EXPERTS = [f"body.inner.blocks.{layer}.ffn.deepspeed_moe.experts.deepspeed_experts.{expert}.{param}"
           for layer in range(MOE_LAYERS) for expert in range(N_EXPERTS) for param in EXPERT_PARAMS]
DENSE = ["embed.weight", "body.inner.blocks.1.ffn.router.weight"]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample_shards")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elastic")


def moe_config(workdir: Path, sample_dir: Path, name: str, zero: int, geometry: str) -> dict:
    cfg = tl.tiny_config(workdir / name, sample_dir, moe=True,
                         train={"max_steps": STEPS, "lr": 3e-3, "sample_bytes": 0},
                         deepspeed={"zero_stage": zero, "expert_parallel_size": GEOMETRIES[geometry][1]})
    # Every token goes to every expert (still spread over the ranks): with top-2 of 4, a near-tie between
    # two experts' scores flips with the reduction order and moves the loss by ~1e-4 within a few steps
    # (measured), which would hide what this test checks.
    cfg["model"]["middle"]["moe"]["top_k"] = N_EXPERTS
    return cfg


def uninterrupted(workdir: Path, sample_dir: Path, zero: int, geometry: str) -> dict:
    """The uninterrupted run of this stage and geometry (trained on first use, then shared)."""
    cfg = moe_config(workdir, sample_dir, f"uninterrupted_zero{zero}_{geometry}", zero, geometry)
    if not tl.metrics(cfg):
        world = GEOMETRIES[geometry][0]
        status = tl.run(cfg, "single" if world == 1 else "torchrun", world)
        assert status == 0, tl.output_of(cfg)[-4000:]
    return cfg


def resume_with_probe(cfg: dict, world: int, dump: Path) -> int:
    """Run elastic_probe.py (resume, record the restored state, train on) on `world` ranks."""
    run_dir = Path(cfg["run"]["dir"])
    config_path = run_dir.parent / f"{run_dir.name}.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    probe = [str(Path(__file__).with_name("elastic_probe.py")), "--config", str(config_path), "--dump", str(dump)]
    if world == 1:
        argv = [str(tl.BIN / "python"), *probe]
    else:
        argv = [str(tl.BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(tl.free_port()), *probe]
    with open(run_dir.parent / f"{run_dir.name}.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=str(tl.REPO), env=tl.child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        return proc.wait(timeout=300)
    except subprocess.TimeoutExpired as err:
        tl.kill_group(proc)  # the launcher and every rank
        raise AssertionError(f"resumed run timed out; output:\n{tl.output_of(cfg)[-4000:]}") from err


def owner(name: str, ep: int) -> tuple[int, str]:
    """(expert-parallel rank, local name) of a parameter given by its ep=1 name: expert g lives on
    rank g // (E / ep) as local expert g % (E / ep); dense parameters everywhere under their own name."""
    match = EXPERT_NAME.match(name)
    if not match:
        return 0, name
    rank, local = divmod(int(match["id"]), N_EXPERTS // ep)
    return rank, f"{match['prefix']}{local}.{match['param']}"


def saved_zero2_state(checkpoint: Path, world: int, ep: int, name: str) -> dict:
    """One parameter's fp32 weight, Adam moments and step from DeepSpeed's ZeRO-1/2 files. Each optimizer
    group is a flat buffer split over the ranks holding it (dense: all ranks; experts: ranks p, p + ep, ...),
    in the parameter order listed (in rank 0's local names) in mp_rank_00_model_states.pt."""
    ep_rank, key = owner(name, ep)
    holders = range(ep_rank, world, ep) if EXPERT_NAME.match(name) else range(world)
    model_file = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes = model_file["param_shapes"]
    group = next(g for g, group_shapes in enumerate(shapes) if key in group_shapes)
    names = list(shapes[group])
    offset = sum(torch.Size(shapes[group][n]).numel() for n in names[:names.index(key)])
    numel = torch.Size(shapes[group][key]).numel()
    parts: dict[str, list] = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
    for rank in holders:
        sd = torch.load(checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                        weights_only=False)["optimizer_state_dict"]
        parts["fp32"].append(sd["single_partition_of_fp32_groups"][group])
        adam = sd["base_optimizer_state"]["state"][group]
        parts["exp_avg"].append(adam["exp_avg"])
        parts["exp_avg_sq"].append(adam["exp_avg_sq"])
        step = adam["step"]
    state = {k: torch.cat(v)[offset:offset + numel].view(shapes[group][key]) for k, v in parts.items()}
    return {**state, "step": step}


def saved_zero0_expert_state(checkpoint: Path, ep: int, name: str) -> dict:
    """One expert parameter's weight (layer_<L>_expert_<g>_... file) and torch Adam state (expp_rank_<p>_...
    file: the expert group lists rank p's parameters in model order: layer, local expert, parameter)."""
    match = EXPERT_NAME.match(name)
    ep_rank, _ = owner(name, ep)
    n_local = N_EXPERTS // ep
    layer, global_id = int(match["layer"]), int(match["id"])
    weights = torch.load(checkpoint / f"layer_{layer}_expert_{global_id}_mp_rank_00_model_states.pt",
                         map_location="cpu", weights_only=False)
    saved = torch.load(checkpoint / f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)["optimizer"]
    group = next(g for g in saved["param_groups"] if g.get("moe"))
    position = (layer * n_local + global_id % n_local) * len(EXPERT_PARAMS) + EXPERT_PARAMS.index(match["param"])
    adam = saved["state"][group["params"][position]]
    return {"fp32": weights[name], "exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"], "step": adam["step"]}


def restored_state(dump: Path, ep: int, name: str) -> dict:
    """What the resumed run restored for one parameter (ep=1 name), from the rank that now owns it (with
    world size == ep, rank p is expert-parallel rank p)."""
    rank, key = owner(name, ep)
    dumped = torch.load(dump / f"rank_{rank}.pt", map_location="cpu", weights_only=False)
    assert dumped["ep_rank"] == rank
    return {**dumped["params"][key], "steps": dumped["steps"]}


@pytest.mark.parametrize("zero,source,target", [
    (2, "2ranks_ep2", "1rank_ep1"),
    (2, "1rank_ep1", "2ranks_ep2"),
    (0, "2ranks_ep2", "1rank_ep1"),
    (0, "1rank_ep1", "2ranks_ep2"),
    (1, "2ranks_ep1", "1rank_ep1"),  # experts partitioned over 2 expert-data-parallel ranks when saved
    # 4 ranks, ep 2 (4 processes on the 2 cores): each expert group split over 2 expert-data-parallel ranks
    # and the experts over 2 expert-parallel ranks, both at once
    (2, "4ranks_ep2", "2ranks_ep2"),
    (2, "2ranks_ep2", "4ranks_ep2"),
], ids=["zero2-2to1", "zero2-1to2", "zero0-2to1", "zero0-1to2", "zero1-2to1-ep1", "zero2-4to2-ep2", "zero2-2to4-ep2"])
def test_moe_resumes_on_another_world_and_expert_parallel_size(workdir, sample_dir, zero, source, target):
    (src_world, src_ep), (dst_world, dst_ep) = GEOMETRIES[source], GEOMETRIES[target]
    written_by = uninterrupted(workdir, sample_dir, zero, source)
    checkpoint = Path(written_by["run"]["dir"]) / "checkpoints" / f"step_{RESUME_AT:08d}"
    cfg = moe_config(workdir, sample_dir, f"resumed_zero{zero}_{source}_to_{target}", zero, target)
    shutil.copytree(checkpoint, Path(cfg["run"]["dir"]) / "checkpoints" / checkpoint.name)
    dump = workdir / f"dump_zero{zero}_{source}_to_{target}"
    dump.mkdir()
    assert resume_with_probe(cfg, dst_world, dump) == 0, tl.output_of(cfg)[-4000:]
    assert f"at step {RESUME_AT} ({src_world} -> {dst_world} ranks)" in tl.output_of(cfg)

    # Every expert's weights and Adam state moved to its new owner unchanged (and dense state, ZeRO-2).
    for name in EXPERTS + (DENSE if zero else []):
        if zero:
            saved = saved_zero2_state(checkpoint, src_world, src_ep, name)
        else:
            saved = saved_zero0_expert_state(checkpoint, src_ep, name)
        restored = restored_state(dump, dst_ep, name)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(restored[key], saved[key]), (name, key)
        assert int(saved["step"]) == RESUME_AT
        assert all(int(step) == RESUME_AT for step in restored["steps"]), name

    # The data stream continues at the same global position, and the losses after the resume are those of
    # an uninterrupted run on the new geometry (only the reduction order and expert placement differ).
    records = tl.metrics(cfg)
    reference = {r["step"]: r for r in tl.metrics(uninterrupted(workdir, sample_dir, zero, target))}
    assert [r["step"] for r in records] == list(range(RESUME_AT + 1, STEPS + 1))
    for r in records:
        assert r["world_size"] == dst_world
        assert r["samples_consumed"] == reference[r["step"]]["samples_consumed"] == 4 * r["step"]
        assert r["data_state"] == reference[r["step"]]["data_state"]
        assert r["loss"] == pytest.approx(reference[r["step"]]["loss"], rel=1e-5), r["step"]


def test_consolidation_names_every_expert_globally_and_names_a_missing_file(workdir, sample_dir, tmp_path):
    """Runs in this process (the consolidation only reads files): the consolidated form of a 2-rank ep=2
    checkpoint holds every expert of every layer once, under its global id; a missing partition file is
    reported by name."""
    from synergy_dist.checkpoint.elastic import consolidate_zero_checkpoint

    run = uninterrupted(workdir, sample_dir, 2, "2ranks_ep2")
    checkpoint = Path(run["run"]["dir"]) / "checkpoints" / f"step_{RESUME_AT:08d}"
    merged = consolidate_zero_checkpoint(checkpoint, 2, 2)
    assert sorted(n for n in merged.params if EXPERT_NAME.match(n)) == sorted(EXPERTS)
    assert merged.moe_groups.count(True) == 1 and [int(s) for s in merged.steps] == [RESUME_AT] * len(merged.steps)
    broken = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, broken)
    (broken / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"checkpoint {broken} lacks zero_pp_rank_1_mp_rank_00_optim_states.pt: it is incomplete for the world "
            "size it records; resume from another checkpoint")):
        consolidate_zero_checkpoint(broken, 2, 2)


def test_expert_names_move_between_expert_parallel_sizes():
    from synergy_dist.checkpoint.expert_layout import experts_per_layer, relayout_expert_names, to_global_key

    prefix = "body.inner.blocks.0.ffn.deepspeed_moe.experts.deepspeed_experts."
    on_rank = [f"{prefix}{i}.{p}" for i in range(2) for p in EXPERT_PARAMS]  # 2 local experts
    assert experts_per_layer(on_rank) == {prefix: 2}
    assert to_global_key(f"{prefix}1.w_up", {prefix: 2}, ep_rank=1) == f"{prefix}3.w_up"
    assert to_global_key("embed.weight", {prefix: 2}, ep_rank=1) == "embed.weight"
    assert relayout_expert_names(on_rank, {prefix: 4}) == [f"{prefix}{i}.{p}" for i in range(4) for p in EXPERT_PARAMS]
    with pytest.raises(ValueError, match="'embed.weight' is not an expert parameter"):
        relayout_expert_names(["embed.weight"], {prefix: 4})
