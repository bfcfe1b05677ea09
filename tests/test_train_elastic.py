"""Elastic resume of an MoE model with expert parallelism under ZeRO-2, in real processes:
2 ranks with expert_parallel_size 2 -> 1 rank (ep 1), and 1 rank -> 2 ranks (ep 2).

Two uninterrupted runs (one per geometry) train STEPS steps, checkpointing every 2. A resumed run starts
from one run's step-RESUME_AT checkpoint on the other geometry (through tests/elastic_probe.py, which
records what the resume restored) and trains to STEPS. Checked: every expert's weights and Adam state
(exp_avg, exp_avg_sq, step) land on the rank that now owns the expert, equal to the saved tensors; the
data stream continues at the same global position; the losses after the resume follow the run that
wrote the checkpoint.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import train_launch as tl

pytestmark = pytest.mark.slow

STEPS = 6
RESUME_AT = 2
N_EXPERTS = tl.TINY_MOE_MIDDLE["moe"]["n_experts"]
GEOMETRIES = {"2ranks_ep2": (2, 2), "1rank_ep1": (1, 1)}  # name: (world size, expert-parallel size)
EXPERT = "body.inner.blocks.{layer}.ffn.deepspeed_moe.experts.deepspeed_experts.{expert}.{param}"


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample_shards")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elastic")


def moe_config(workdir: Path, sample_dir: Path, name: str, geometry: str) -> dict:
    ep = GEOMETRIES[geometry][1]
    cfg = tl.tiny_config(workdir / name, sample_dir, moe=True, train={"max_steps": STEPS, "lr": 3e-3, "sample_bytes": 0},
                         deepspeed={"zero_stage": 2, "expert_parallel_size": ep})
    # Every token goes to every expert (still spread over the ranks): with top-2 of 4, a near-tie between
    # two experts' scores flips with the reduction order and moves the loss by ~1e-4 within a few steps,
    # which would hide what this test checks.
    cfg["model"]["middle"]["moe"]["top_k"] = N_EXPERTS
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(workdir, sample_dir) -> dict[str, dict]:
    """One uninterrupted run per geometry."""
    runs = {}
    for geometry, (world, _) in GEOMETRIES.items():
        cfg = moe_config(workdir, sample_dir, f"uninterrupted_{geometry}", geometry)
        status = tl.run(cfg, "single" if world == 1 else "torchrun", world)
        assert status == 0, tl.output_of(cfg)[-4000:]
        runs[geometry] = cfg
    return runs


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
        return subprocess.run(argv, cwd=str(tl.REPO), env=tl.child_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=300).returncode


def saved_state(checkpoint: Path, world: int, ep: int, name: str) -> dict:
    """One parameter's fp32 weight, Adam moments and step read straight from DeepSpeed's ZeRO-1/2 files
    (name: its ep=1 name). Each optimizer group is a flat buffer split over the ranks holding it, in the
    parameter order listed (in rank 0's local names) in mp_rank_00_model_states.pt."""
    match = re.match(r"^(.*deepspeed_experts\.)(\d+)(\..+)$", name)
    if match:  # expert g lives on expert-parallel rank g // (E / ep) as local expert g % (E / ep)
        owner, local = divmod(int(match[2]), N_EXPERTS // ep)
        key, holders = f"{match[1]}{local}{match[3]}", range(owner, world, ep)
    else:
        key, holders = name, range(world)
    shapes = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["param_shapes"]
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


def restored_state(dump: Path, world: int, ep: int, name: str) -> dict:
    """What the resumed run restored for one parameter (ep=1 name), from the rank that now owns it."""
    match = re.match(r"^(.*deepspeed_experts\.)(\d+)(\..+)$", name)
    rank, key = 0, name
    if match:
        owner, local = divmod(int(match[2]), N_EXPERTS // ep)
        rank, key = owner, f"{match[1]}{local}{match[3]}"  # with world == ep, rank p is expert-parallel rank p
    dumped = torch.load(dump / f"rank_{rank}.pt", map_location="cpu", weights_only=False)
    if match:
        assert dumped["ep_rank"] == owner
    return {**dumped["params"][key], "steps": dumped["steps"]}


@pytest.mark.parametrize("source,target", [("2ranks_ep2", "1rank_ep1"), ("1rank_ep1", "2ranks_ep2")])
def test_moe_zero2_resumes_on_another_world_and_expert_parallel_size(workdir, sample_dir, uninterrupted,
                                                                      source, target):
    (src_world, src_ep), (dst_world, dst_ep) = GEOMETRIES[source], GEOMETRIES[target]
    written_by = uninterrupted[source]
    checkpoint = Path(written_by["run"]["dir"]) / "checkpoints" / f"step_{RESUME_AT:08d}"
    cfg = moe_config(workdir, sample_dir, f"resumed_{source}_to_{target}", target)
    shutil.copytree(checkpoint, Path(cfg["run"]["dir"]) / "checkpoints" / checkpoint.name)
    dump = workdir / f"dump_{source}_to_{target}"
    dump.mkdir()
    assert resume_with_probe(cfg, dst_world, dump) == 0, tl.output_of(cfg)[-4000:]
    assert f"at step {RESUME_AT} ({src_world} -> {dst_world} ranks)" in tl.output_of(cfg)

    # Every expert's weights and Adam state moved to its new owner unchanged; dense state too.
    names = [EXPERT.format(layer=layer, expert=expert, param=param)
             for layer in (0, 1) for expert in range(N_EXPERTS) for param in ("w_gate", "w_up", "w_down")]
    for name in names + ["embed.weight", "body.inner.blocks.1.ffn.router.weight"]:
        saved = saved_state(checkpoint, src_world, src_ep, name)
        restored = restored_state(dump, dst_world, dst_ep, name)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(restored[key], saved[key]), (name, key)
        assert all(int(step) == int(saved["step"]) == RESUME_AT for step in restored["steps"]), name

    # The data stream continues at the same global position ...
    records = tl.metrics(cfg)
    reference = {r["step"]: r for r in tl.metrics(written_by)}
    assert [r["step"] for r in records] == list(range(RESUME_AT + 1, STEPS + 1))
    for r in records:
        assert r["world_size"] == dst_world
        assert r["samples_consumed"] == reference[r["step"]]["samples_consumed"] == 4 * r["step"]
        assert r["data_state"] == reference[r["step"]]["data_state"]
    # ... and training continues where the checkpoint's run left off: same weights, same Adam state and
    # data, only the reduction order and the expert placement differ.
    for r in records:
        assert r["loss"] == pytest.approx(reference[r["step"]]["loss"], rel=1e-5), r["step"]
