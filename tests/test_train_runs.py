"""The trainer in real processes: 1 rank, and 2 ranks (gloo) through `torchrun` and the `deepspeed`
launcher; resume exactness after kill -9, after a kill mid-save and after SIGTERM; ZeRO stages and
expert parallelism; elastic 2 -> 1 and 1 -> 2 resume (ZeRO-0/2/3); NaN/Inf skips; spike rollback; grad norm by hand."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import train_launch as tl

pytestmark = pytest.mark.slow

STEPS = 8  # every run here trains this many steps, checkpointing every 2


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample_shards")  # the first run preprocesses the bundled corpus here


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def config(workdir: Path, sample_dir: Path, name: str, moe: bool = False, zero: int = 0, ep: int = 1,
           **sections) -> dict:
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": STEPS, "lr": 3e-3, "sample_bytes": 0, **sections["train"]}
    sections["deepspeed"] = {"zero_stage": zero, "expert_parallel_size": ep, **sections.get("deepspeed", {})}
    return tl.tiny_config(workdir / name, sample_dir, moe=moe, **sections)


def finished(cfg: dict, launcher: str = "single", nproc: int = 1,
             overrides: list[str] | None = None) -> dict[int, float]:
    status = tl.run(cfg, launcher, nproc, overrides)
    assert status == 0, tl.output_of(cfg)[-4000:]
    return tl.losses_by_step(cfg)


@pytest.fixture(scope="module")
def reference_1rank(workdir, sample_dir) -> dict:
    cfg = config(workdir, sample_dir, "reference_1rank")
    finished(cfg)
    return cfg


@pytest.fixture(scope="module")
def reference_2rank_zero2(workdir, sample_dir) -> dict:
    cfg = config(workdir, sample_dir, "reference_2rank_zero2", zero=2)
    finished(cfg, "torchrun", 2)
    return cfg


def test_reference_run_logs_the_promised_metrics(reference_1rank):
    records = tl.metrics(reference_1rank)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        for key in ("loss", "bpb", "lr", "grad_norm", "bytes_per_s", "concept_tokens_per_s", "mfu", "memory_mb",
                    "stage0/bytes_per_concept", "skipped_steps", "samples_consumed", "data_state"):
            assert key in r, key
        assert math.isfinite(r["loss"]) and r["world_size"] == 1
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=0.05)  # CE dominates the loss
        assert r["samples_consumed"] == 4 * r["step"]
        # where the step went: the phases and the rest add up to the step, each non-negative
        phases = [r[f"time_{p}_s"] for p in ("data", "forward", "backward", "optimizer", "other")]
        assert min(phases) >= 0 and r["time_forward_s"] > 0 and r["time_backward_s"] > 0
        assert sum(phases) == pytest.approx(r["step_time_s"], rel=0.05, abs=2e-3)
        assert 0 < r["cpu_step_s"] and r["cpu_forward_s"] + r["cpu_backward_s"] <= r["cpu_step_s"] + 1e-6
    assert records[-1]["loss"] < records[0]["loss"]
    run_dir = Path(reference_1rank["run"]["dir"])
    assert (run_dir / "config.yaml").is_file()
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["samples_consumed"] == 4 * STEPS and state["world_size"] == 1


def test_logged_bpb_is_the_global_batchs_whatever_the_split(reference_1rank, reference_2rank_zero2):
    """Step 1 (same initial weights, same global batch of 4 windows): bits per byte over 4 micro-batches on one
    rank equals that over 2 x 2 on two ranks, summed bits over summed bytes (docs/EVALUATION.md)."""
    one, two = tl.metrics(reference_1rank)[0], tl.metrics(reference_2rank_zero2)[0]
    assert (one["step"], two["step"], one["samples_consumed"], two["samples_consumed"]) == (1, 1, 4, 4)
    assert one["bpb"] == pytest.approx(two["bpb"], rel=1e-5)


@pytest.mark.parametrize("launcher,nproc,zero", [("single", 1, 0), ("torchrun", 2, 2)])
def test_kill9_and_resume_gives_bitwise_equal_losses(workdir, sample_dir, request, launcher, nproc, zero):
    reference = request.getfixturevalue("reference_1rank" if nproc == 1 else "reference_2rank_zero2")
    cfg = config(workdir, sample_dir, f"kill9_{launcher}", zero=zero)
    proc = tl.start(cfg, launcher, nproc, ["debug.hang_after_step=5"])
    tl.wait_for_step(proc, cfg, 5)
    tl.kill_group(proc)
    assert max(tl.losses_by_step(cfg)) == 5
    resumed = finished(cfg, launcher, nproc)
    assert "resumed from " + str(Path(cfg["run"]["dir"]) / "checkpoints" / "step_00000004") in tl.output_of(cfg)
    assert resumed == tl.losses_by_step(reference)  # bitwise: floats compare exactly


def test_resume_skips_a_checkpoint_killed_mid_save(workdir, sample_dir, reference_1rank):
    cfg = config(workdir, sample_dir, "killed_mid_save")
    assert tl.run(cfg, overrides=["debug.kill_in_save_at_step=4"]) == -signal.SIGKILL
    half = Path(cfg["run"]["dir"]) / "checkpoints" / "step_00000004"
    assert half.is_dir() and not (half / "COMPLETE").exists()
    assert finished(cfg) == tl.losses_by_step(reference_1rank)
    out = tl.output_of(cfg)
    assert f"skipping checkpoint {half}: no completion marker (killed while saving?)" in out
    assert f"resumed from {half.parent / 'step_00000002'} at step 2" in out


@pytest.mark.parametrize("launcher,nproc,zero,sig", [("single", 1, 0, "USR1"), ("torchrun", 2, 2, "TERM")])
def test_sigterm_checkpoints_exits_75_and_resumes(workdir, sample_dir, request, launcher, nproc, zero, sig):
    reference = request.getfixturevalue("reference_1rank" if nproc == 1 else "reference_2rank_zero2")
    cfg = config(workdir, sample_dir, f"sig{sig}_{launcher}", zero=zero)
    proc = tl.start(cfg, launcher, nproc, ["debug.hang_after_step=3"])
    tl.wait_for_step(proc, cfg, 3)
    # The ranks get the signal (as from SLURM); under torchrun the ranks are the launcher's children.
    targets = tl.rank_pids(proc)
    assert len(targets) == nproc
    for pid in targets:
        subprocess.run(["kill", f"-{sig}", str(pid)], check=True)
    status = proc.wait(timeout=120)
    if launcher == "single":
        assert status == 75
    else:  # torchrun reports the ranks' own exit status
        assert status != 0 and "exitcode  : 75" in tl.output_of(cfg)
    ckpt_dir = Path(cfg["run"]["dir"]) / "checkpoints" / "step_00000004"
    assert (ckpt_dir / "COMPLETE").is_file()  # finished the step in flight, then checkpointed
    assert max(tl.losses_by_step(cfg)) == 4
    assert finished(cfg, launcher, nproc) == tl.losses_by_step(reference)


@pytest.mark.parametrize("launcher,zero,moe,ep", [
    ("torchrun", 3, False, 1),
    ("deepspeed", 1, True, 2),
    ("deepspeed", 2, True, 2),
])
def test_two_rank_launchers_zero_stages_and_expert_parallel(workdir, sample_dir, request, launcher, zero, moe, ep):
    cfg = config(workdir, sample_dir, f"{launcher}_zero{zero}_ep{ep}", moe=moe, zero=zero, ep=ep)
    losses = finished(cfg, launcher, 2)
    records = tl.metrics(cfg)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["world_size"] == 2 for r in records)
    if moe:  # ep=2 must train the same model as ep=1 (same weights, same data)
        reference = config(workdir, sample_dir, "moe_ep1_zero2", moe=True, zero=2, ep=1)
        if not tl.metrics(reference):
            finished(reference, "torchrun", 2)
        assert any(k.startswith("moe/") for k in records[-1])
    else:
        reference = request.getfixturevalue("reference_1rank")
    expected = tl.losses_by_step(reference)
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize("zero,before,after", [(0, 2, 1), (2, 2, 1), (2, 1, 2), (3, 2, 1), (3, 1, 2)])
def test_elastic_resume_continues_the_same_stream(workdir, sample_dir, reference_1rank, zero, before, after):
    cfg = config(workdir, sample_dir, f"elastic_zero{zero}_{before}_to_{after}", zero=zero)
    launcher = {1: "single", 2: "torchrun"}
    proc = tl.start(cfg, launcher[before], before, ["debug.hang_after_step=5"])
    tl.wait_for_step(proc, cfg, 5)
    tl.kill_group(proc)
    losses = finished(cfg, launcher[after], after)
    assert f"at step 4 ({before} -> {after} ranks)" in tl.output_of(cfg)
    records = tl.metrics(cfg)
    assert records[-1]["world_size"] == after and records[-1]["samples_consumed"] == 4 * STEPS
    expected = tl.losses_by_step(reference_1rank)  # same data and math; only reduction order differs
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], rel=1e-5), step
    if zero == 3 and before == 2:  # our ZeRO-3 consolidation reads the weights as DeepSpeed's own zero_to_fp32 does
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from synergy_dist.checkpoint.elastic import consolidate_zero3_checkpoint

        checkpoints = Path(cfg["run"]["dir"]) / "checkpoints"
        ours = consolidate_zero3_checkpoint(checkpoints / "step_00000004", 2).params
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag="step_00000004")
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[name]["fp32"], theirs[name]) for name in theirs)


def module_state(cfg: dict, step: int) -> dict:
    path = Path(cfg["run"]["dir"]) / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.parametrize("launcher,nproc,zero", [("single", 1, 0), ("torchrun", 2, 2)])
def test_nan_loss_and_inf_gradient_are_skipped_on_every_rank(workdir, sample_dir, launcher, nproc, zero):
    cfg = config(workdir, sample_dir, f"nonfinite_{launcher}", zero=zero,
                 checkpoint={"every_steps": 1, "keep_last": 20},
                 debug={"nan_loss_batches": [3], "inf_grad_batches": [5]})
    finished(cfg, launcher, nproc)
    records = {r["step"]: r for r in tl.metrics(cfg)}
    assert [s for s, r in records.items() if r["skipped"]] == [3, 5]
    assert records[3]["skip_reason"] == records[5]["skip_reason"] == "nonfinite"
    assert math.isnan(records[3]["loss"]) and math.isfinite(records[5]["loss"])
    assert records[STEPS]["skipped_nonfinite"] == 2
    assert all(math.isfinite(records[s]["loss"]) for s in records if s not in (3,))
    for skipped in (3, 5):  # the weights did not move on a skipped step ...
        before, after = module_state(cfg, skipped - 1), module_state(cfg, skipped)
        assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = module_state(cfg, 5), module_state(cfg, 6)  # ... and they move again afterwards
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_repeated_spikes_roll_back_and_skip_the_data(workdir, sample_dir):
    cfg = config(workdir, sample_dir, "spike_rollback", train={"max_steps": 10},
                 safeguards={"spike_zscore": 8.0, "spike_window": 10, "spike_min_history": 3,
                             "max_consecutive_spikes": 2},
                 debug={"spike_loss_batches": [7, 8], "spike_factor": 1000.0})
    finished(cfg)
    run_dir = Path(cfg["run"]["dir"])
    records = tl.metrics(cfg)
    # Step 7 is a skipped spike; the second spike (step 8) triggers the rollback to step 6, so steps
    # 7.. are trained again, on the data after the poisoned batches.
    assert [(r["step"], r["skip_reason"]) for r in records] == [
        (1, "ok"), (2, "ok"), (3, "ok"), (4, "ok"), (5, "ok"), (6, "ok"), (7, "loss_spike"),
        (7, "ok"), (8, "ok"), (9, "ok"), (10, "ok")]
    events = (run_dir / "events.log").read_text()
    assert (f"rollback at step 8 to {run_dir / 'checkpoints' / 'step_00000006'} (step 6); "
            "skipping samples [24, 32)") in events
    assert records[-1]["rollbacks"] == 1 and records[-1]["samples_consumed"] == 10 * 4 + 8
    state = json.loads((run_dir / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    assert state["safeguards"]["rollbacks"] == [{"at_step": 8, "to_step": 6, "skipped_samples": [24, 32]}]
    assert state["data_offset"] == 8


def test_the_default_spike_rule_catches_10x_loss_and_gradient_spikes(workdir, sample_dir):
    # the defaults' spike_zscore and spike_ratio; a short window, since the run is short
    cfg = config(workdir, sample_dir, "spikes_10x", train={"max_steps": 10},
                 safeguards={"spike_window": 10, "spike_min_history": 4},
                 debug={"spike_loss_batches": [7], "spike_grad_batches": [9], "spike_factor": 10.0})
    finished(cfg)
    records = tl.metrics(cfg)
    assert [(r["step"], r["skip_reason"]) for r in records if r["skipped"]] == [(7, "loss_spike"), (9, "grad_spike")]
    assert records[-1]["skipped_spikes"] == 2 and records[-1]["rollbacks"] == 0


def hand_grad_norm(cfg_dict: dict, sample_dir: Path) -> float:
    """The first step's global grad norm computed directly: mean of the 4 per-sample losses' gradients."""
    from data_pipeline.stream import StreamingByteDataset
    from synergy_dist.config import config_from_dict
    from synergy_dist.model.synergy import SynergyLM
    from synergy_dist.train.seeding import seed_everything

    cfg = config_from_dict(cfg_dict)
    seed_everything(cfg.seed)
    model = SynergyLM(cfg.model)
    data = StreamingByteDataset([str(sample_dir / "train")], seq_len=cfg.data.seq_len, global_batch_size=4,
                                micro_batch_size=1, seed=cfg.seed, rank=0, world_size=1)
    samples = [s for _, s in zip(range(4), data)]
    total = sum(model(s["input_ids"][None], labels=s["labels"][None]).loss for s in samples) / 4
    total.backward()
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


@pytest.mark.parametrize("which", ["reference_1rank", "reference_2rank_zero2"])
def test_reported_grad_norm_equals_hand_computation(request, sample_dir, which):
    cfg = request.getfixturevalue(which)
    reported = tl.metrics(cfg)[0]["grad_norm"]
    assert reported == pytest.approx(hand_grad_norm(cfg, sample_dir), rel=1e-5)


def test_tiny_cpu_main_job_learns_and_reports_where_things_are(tmp_path, sample_dir):
    cfg_path = tl.REPO / "configs" / "tiny-cpu.yaml"
    run_dir = tmp_path / "tiny"
    out = subprocess.run([str(tl.BIN / "synergy-train"), "--config", str(cfg_path), f"run.dir={run_dir}",
                          f"data.sample_dir={sample_dir}", "train.max_steps=40", "log.every_steps=5",
                          "train.eval_every_steps=20", "checkpoint.every_steps=20", "train.sample_bytes=40"],
                         cwd=str(tl.REPO), env=tl.child_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["bpb"] - records[-1]["bpb"] > 1.0, [r["bpb"] for r in records]
    assert "eval_bpb" in records[3] and records[-1]["eval_bpb"] < 8.0
    assert f"checkpoint: {run_dir / 'checkpoints' / 'step_00000040'}" in out.stdout
    assert f"metrics:    {run_dir / 'metrics.jsonl'}" in out.stdout
    assert f"sample:     {run_dir / 'sample.txt'}" in out.stdout
    assert len((run_dir / "sample.txt").read_bytes()) == len(b"def ") + 40


def test_router_warmup_routes_by_the_stride_while_it_holds_the_larger_share(workdir, sample_dir):
    """The trainer sets the warm-up before each step: with warmup_steps=STEPS the stride (every 3 bytes of a
    document, the tiny model's N) decides steps 1-5 (share >= 0.5), so their compression is 3 bytes per concept
    less the extra concepts that document starts force."""
    cfg = config(workdir, sample_dir, "router_warmup")
    finished(cfg, overrides=[f"model.stages.0.router.warmup_steps={STEPS}"])
    realised = [r["stage0/bytes_per_concept"] for r in tl.metrics(cfg)]
    assert all(2.5 <= x <= 3.0 for x in realised[:5]), realised


def ensure_run(cfg: dict, launcher: str, nproc: int) -> dict:
    if not tl.metrics(cfg) or tl.metrics(cfg)[-1]["step"] != STEPS:
        finished(cfg, launcher, nproc)
    return cfg


def exported_loss(directory: Path, sample_dir: Path) -> float:
    from data_pipeline.stream import StreamingByteDataset
    from synergy_dist.loading import load_model

    model = load_model(directory)[0]
    data = StreamingByteDataset([str(sample_dir / "train")], seq_len=64, global_batch_size=4, micro_batch_size=4,
                                seed=1, rank=0, world_size=1)
    batch = torch.utils.data.default_collate([s for _, s in zip(range(4), data)])
    with torch.no_grad():
        return float(model(batch["input_ids"], labels=batch["labels"]).loss)


def test_export_consolidates_zero3_and_expert_parallel_checkpoints(workdir, sample_dir, reference_1rank, tmp_path):
    from synergy_dist.cli.export import main as export_main

    runs = {
        "dense": reference_1rank,
        "zero3": ensure_run(config(workdir, sample_dir, "torchrun_zero3_ep1", zero=3), "torchrun", 2),
        "moe_ep1": ensure_run(config(workdir, sample_dir, "moe_ep1_zero2", moe=True, zero=2), "torchrun", 2),
        "moe_ep2": ensure_run(config(workdir, sample_dir, "deepspeed_zero2_ep2", moe=True, zero=2, ep=2),
                              "deepspeed", 2),
    }
    losses = {}
    for name, cfg in runs.items():
        assert export_main([cfg["run"]["dir"], "--output", str(tmp_path / name)]) == 0
        losses[name] = exported_loss(tmp_path / name, sample_dir)  # loads strictly, without DeepSpeed
    from safetensors.torch import load_file

    dense = load_file(str(tmp_path / "dense" / "model.safetensors"))
    saved = module_state(runs["dense"], STEPS)
    assert dense.keys() == saved.keys() and all(torch.equal(dense[k], saved[k]) for k in saved)
    experts = [k for k in load_file(str(tmp_path / "moe_ep2" / "model.safetensors")) if "deepspeed_experts" in k]
    assert len(experts) == 2 * 4 * 3  # 2 MoE layers x 4 experts x (gate, up, down), gathered from both ranks
    assert losses["zero3"] == pytest.approx(losses["dense"], rel=1e-4)
    assert losses["moe_ep2"] == pytest.approx(losses["moe_ep1"], rel=1e-3)
    assert export_main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2


def test_zero0_grad_norm_with_expert_parallel_counts_every_expert(workdir, sample_dir):
    """DeepSpeed's ZeRO-0 clipping path under-reports the norm with experts; ours must equal ZeRO-2's."""
    zero2 = ensure_run(config(workdir, sample_dir, "deepspeed_zero2_ep2", moe=True, zero=2, ep=2), "deepspeed", 2)
    zero0 = config(workdir, sample_dir, "torchrun_zero0_ep2", moe=True, zero=0, ep=2, train={"max_steps": 2})
    finished(zero0, "torchrun", 2)
    reported = {r["step"]: r["grad_norm"] for r in tl.metrics(zero0)}
    expected = {r["step"]: r["grad_norm"] for r in tl.metrics(zero2)}
    assert reported[1] == pytest.approx(expected[1], rel=1e-5)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_bf16_training_keeps_moe_routers_fp32(workdir, sample_dir, moe):
    """bf16 on CPU, dense and MoE: fp32 parameters under autocast, since DeepSpeed's bf16 mode would cast the
    boundary routers, residual projections and MoE routers (whose forwards refuse non-fp32)."""
    cfg = config(workdir, sample_dir, f"bf16_{'moe' if moe else 'dense'}", moe=moe, zero=2,
                 precision={"dtype": "bf16"}, train={"max_steps": 3})
    losses = finished(cfg)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    # reaching here means every router, residual and MoE gate found its weight in fp32 (they raise otherwise)


def test_activation_checkpointing_trains_bitwise_like_the_reference(workdir, sample_dir, reference_1rank):
    cfg = config(workdir, sample_dir, "activation_checkpointing", deepspeed={"activation_checkpointing": True})
    assert finished(cfg) == tl.losses_by_step(reference_1rank)
