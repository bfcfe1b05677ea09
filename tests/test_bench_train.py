"""`synergy-bench train`: its arithmetic, the run configs it writes, its errors, and one smoke run with a tiny
model whose JSON must hold figures consistent with the metrics the trainer wrote (never the figures' sizes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from synergy_dist.bench import train as bench
from synergy_dist.bench.results import write_results
from synergy_dist.config import load_config
from synergy_dist.train.metrics import read_metrics

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = {
    "model": {
        "stages": [{
            "d_model": 32,
            "encoder": {"pattern": "M", "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 16}},
            "decoder": {"pattern": "M", "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 16}},
            "router": {"kind": "cosine", "target_bytes_per_concept": 3.0},
        }],
        "d_middle": 48,
        "middle": {"pattern": "A", "repeat": 2, "n_heads": 2, "mlp_ratio": 2.0, "pos_encoding": "none"},
    },
    "data": {"seq_len": 64},
    "batch": {"global_batch_size": 2, "micro_batch_size": 2},
    "schedule": {"warmup_steps": 2},
}


@pytest.fixture()
def tiny_yaml(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ---------------------------------------------------------------------------------- arithmetic


def test_steady_records_drop_the_warmup_steps():
    records = [{"step": s} for s in range(1, 6)]
    assert [r["step"] for r in bench.steady_records(records, 2)] == [3, 4, 5]
    assert bench.steady_records(records, 0) == records


def test_per_rank_throughput_divides_by_world_size():
    records = [{"bytes_per_s": 1000.0, "world_size": 2}, {"bytes_per_s": 300.0, "world_size": 1}]
    assert bench.per_rank_bytes_per_s(records) == [500.0, 300.0]


def test_scaling_efficiency_is_per_rank_parallel_over_single():
    assert bench.scaling_efficiency(850.0, 1000.0) == pytest.approx(0.85)
    assert bench.scaling_efficiency(1200.0, 1000.0) == pytest.approx(1.2)
    assert bench.scaling_efficiency(None, 1000.0) is None
    assert bench.scaling_efficiency(850.0, 0.0) is None


def test_overhead_is_the_share_of_trainer_step_time_beyond_the_plain_loop():
    assert bench.overhead_percent(0.5, 0.45) == pytest.approx(10.0)
    assert bench.overhead_percent(1.0, 1.1) == pytest.approx(-10.0)  # noise can make it negative; reported as is
    assert bench.overhead_percent(None, 0.4) is None
    assert bench.overhead_percent(0.0, 0.4) is None


# ---------------------------------------------------------------------------------- run configs


@pytest.mark.parametrize("world", [1, 2])
def test_run_config_keeps_the_per_rank_batch_and_sets_zero2(tmp_path, world):
    cfg = bench.TrainBenchConfig(steps=7, sample_dir=str(tmp_path / "sample"))
    values = bench.run_config(cfg, "dense", world, tmp_path / "run")
    path = bench.write_config(values, tmp_path / "run.yaml")
    loaded = load_config(str(path))
    assert loaded.batch.micro_batch_size == 8  # configs/tiny-cpu.yaml
    assert loaded.global_batch_sequences() == 8 * world
    assert loaded.grad_accumulation_steps(world) == 1
    assert loaded.deepspeed.zero_stage == 2
    assert loaded.train.max_steps == 7 and loaded.log.every_steps == 1 and loaded.train.threads == 1
    assert loaded.checkpoint.every_steps == 0 and not loaded.checkpoint.save_at_end and not loaded.checkpoint.resume
    assert loaded.data.sample_dir == str(tmp_path / "sample")


@pytest.mark.parametrize("world", [1, 2])
def test_moe_run_sets_expert_parallel_to_the_world_size(tmp_path, world):
    values = bench.run_config(bench.TrainBenchConfig(), "moe", world, tmp_path / "run")
    loaded = load_config(str(bench.write_config(values, tmp_path / "run.yaml")))
    assert loaded.deepspeed.expert_parallel_size == world
    assert loaded.global_batch_sequences() == 4 * world  # configs/tiny-moe-cpu.yaml: micro-batch 4


def test_micro_batch_override_scales_the_global_batch_with_the_ranks(tmp_path):
    values = bench.run_config(bench.TrainBenchConfig(micro_batch_size=32), "dense", 2, tmp_path / "run")
    loaded = load_config(str(bench.write_config(values, tmp_path / "run.yaml")))
    assert (loaded.batch.micro_batch_size, loaded.global_batch_sequences(),
            loaded.grad_accumulation_steps(2)) == (32, 64, 1)


def test_commands_launch_one_process_or_torchrun(tmp_path):
    single = bench.train_command(tmp_path / "c.yaml", 1)
    assert Path(single[0]).name == "synergy-train" and single[1:] == ["--config", str(tmp_path / "c.yaml")]
    parallel = bench.train_command(tmp_path / "c.yaml", 2)
    assert Path(parallel[0]).name == "torchrun" and parallel[1:3] == ["--nproc_per_node", "2"]
    assert "--no-python" in parallel and parallel[-3:] == [single[0], "--config", str(tmp_path / "c.yaml")]


def test_launch_keeps_a_finished_run_that_crashed_at_exit_and_drops_an_unfinished_one(tmp_path, monkeypatch):
    run_dir, config = tmp_path / "run", tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run": {"dir": str(run_dir)}}))
    lines = [json.dumps({"step": s, "world_size": 1, "bytes_per_s": 10.0, "step_time_s": 0.1}) for s in (1, 2)]
    records = " ".join(repr(x) for x in lines)
    script = f"mkdir -p {run_dir} && printf '%s\\n' {records} > {run_dir}/metrics.jsonl; exit 1"
    monkeypatch.setattr(bench, "train_command", lambda path, world: ["bash", "-c", script])
    log = config.with_suffix(".log")
    records, problem = bench.launch(config, 1, steps=2)
    assert [r["step"] for r in records] == [1, 2]
    assert problem == f"synergy-train (1 rank(s)) exited with 1 after logging all 2 steps (log: {log})"
    records, problem = bench.launch(config, 1, steps=3)
    assert records == [] and problem == f"synergy-train (1 rank(s)) exited with 1 (log: {log})"


def test_use_every_core_undoes_a_one_core_pin():
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert bench.use_every_core() >= allowed  # at least every CPU the test process started with
    finally:
        os.sched_setaffinity(0, allowed)


# ---------------------------------------------------------------------------------- errors


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match=r"variants \['sparse'\] are unknown; choose from \['dense', 'moe'\]"):
        bench.TrainBenchConfig(variants=["sparse"]).validate()
    with pytest.raises(ValueError, match="need steps >= 1 and 0 <= warmup_steps < steps"):
        bench.TrainBenchConfig(steps=3, warmup_steps=3).validate()
    with pytest.raises(ValueError, match=r"micro_batch_size=-1 must be >= 0 \(0 = the config's\)"):
        bench.TrainBenchConfig(micro_batch_size=-1).validate()
    with pytest.raises(FileNotFoundError, match="config /nonexistent.yaml not found"):
        bench.TrainBenchConfig(checkpoint_configs=["/nonexistent.yaml"]).validate()


def test_command_reports_a_missing_config_and_exits_2(tmp_path, capsys):
    from synergy_dist.cli.bench import main

    status = main(["train", "--out", str(tmp_path), "--checkpoint-config", "/nonexistent.yaml"])
    assert status == 2
    assert "synergy-bench: error: train benchmark: config /nonexistent.yaml not found" in capsys.readouterr().err
    assert not (tmp_path / "train.json").exists()


# ---------------------------------------------------------------------------------- smoke run


def test_smoke_run_writes_figures_consistent_with_the_trainer_metrics(tmp_path, tiny_yaml):
    cfg = bench.TrainBenchConfig(dense_config=str(tiny_yaml), variants=["dense"], steps=4, warmup_steps=1,
                                 checkpoint_configs=[str(tiny_yaml)], checkpoint_repeats=2,
                                 sample_dir=str(tmp_path / "sample"), work_dir=str(tmp_path / "work"))
    report = bench.run(cfg, "synergy-bench train --quick")
    json_path, md_path = write_results(tmp_path / "out", [report], stem="train", load_at_start=[0.0, 0.0, 0.0])
    result = json.loads(json_path.read_text())["benchmarks"]["train"]
    figures = result["figures"]

    # Per-rank throughput: the trainer's bytes_per_s / world_size of steps 2..4, as logged in each run's metrics.
    for world in (1, 2):  # every timed run uses a fixed router at the config's target: the same work per byte
        run_yaml = yaml.safe_load((tmp_path / "work" / f"dense-{world}rank.yaml").read_text())
        assert [s["router"]["kind"] for s in run_yaml["model"]["stages"]] == ["stride"]
        assert run_yaml["model"]["stages"][0]["router"]["stride"] == 3  # the tiny config targets 3 bytes per concept
    for world in (1, 2):
        records = read_metrics(tmp_path / "work" / f"dense-{world}rank" / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert {r["world_size"] for r in records} == {world}
        figure = figures[f"dense/zero2_{world}rank/bytes_per_s_per_rank"]
        assert figure["samples"] == pytest.approx([r["bytes_per_s"] / world for r in records[1:]])
        assert figures[f"dense/zero2_{world}rank/step_time"]["samples"] == pytest.approx(
            [r["step_time_s"] for r in records[1:]])

    per_rank_1 = figures["dense/zero2_1rank/bytes_per_s_per_rank"]["value"]
    per_rank_2 = figures["dense/zero2_2rank/bytes_per_s_per_rank"]["value"]
    targets = {t["name"].split(":")[0]: t for t in result["targets"]}
    scaling = targets["dense ZeRO-2"]
    assert scaling["measured"] == pytest.approx(per_rank_2 / per_rank_1)
    assert (scaling["op"], scaling["threshold"]) == (">=", 0.85)
    assert scaling["status"] == ("met" if per_rank_2 / per_rank_1 >= 0.85 else "missed")

    # CPU time per step and rank: every rank's steady steps pooled; the idle-core bound is cpu(1) / cpu(2).
    cpu_1, cpu_2 = (figures[f"dense/zero2_{w}rank/step_cpu_per_rank"] for w in (1, 2))
    assert (len(cpu_1["samples"]), len(cpu_2["samples"])) == (3, 6)
    assert figures["dense/scaling_efficiency_cpu"]["value"] == pytest.approx(cpu_1["value"] / cpu_2["value"])

    # Overhead: trainer and plain steps timed alternately in one process; the target is on CPU-time medians.
    for clock in ("cpu", "wall"):
        for name in ("trainer", "plain"):
            assert len(figures[f"dense/{name}_step_{clock}"]["samples"]) == 3  # steps 2..4
            assert figures[f"dense/{name}_step_{clock}"]["value"] > 0
    trainer_step, plain_step = figures["dense/trainer_step_cpu"]["value"], figures["dense/plain_step_cpu"]["value"]
    assert figures["dense/engine_and_trainer_vs_plain"]["value"] == pytest.approx(
        100 * (trainer_step - plain_step) / trainer_step)
    trainer_wall, plain_wall = figures["dense/trainer_step_wall"]["value"], figures["dense/plain_step_wall"]["value"]
    assert figures["dense/engine_and_trainer_vs_plain_wall"]["value"] == pytest.approx(
        100 * (trainer_wall - plain_wall) / trainer_wall)
    # The judged overhead: per step, the share of the trainer step outside the engine's forward/backward/step calls.
    own = figures["dense/trainer_overhead"]
    assert len(own["samples"]) == 3 and all(0 < share < 100 for share in own["samples"])
    overhead = targets["dense"]
    assert overhead["measured"] == pytest.approx(own["value"])
    assert (overhead["op"], overhead["threshold"], overhead["unit"]) == ("<", 5.0, "%")

    # Checkpoint: every repeat timed; fp32 weights + fp32 master + two Adam moments are >= 16 bytes a parameter.
    params = figures["checkpoint/tiny/params"]["value"]
    assert params > 0
    for what in ("save", "verify", "load", "size"):
        assert len(figures[f"checkpoint/tiny/{what}"]["samples"]) == 2
        assert figures[f"checkpoint/tiny/{what}"]["value"] > 0
    assert figures["checkpoint/tiny/size"]["value"] * 1e6 >= 16 * params
    assert not (tmp_path / "work" / "checkpoint-tiny" / "checkpoints").exists()  # cleaned up after timing

    markdown = md_path.read_text()
    assert "## train" in markdown and "Command: `synergy-bench train --quick`" in markdown
    assert "| dense/trainer_overhead |" in markdown
