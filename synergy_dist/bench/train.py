"""`synergy-bench train`: data-parallel scaling, trainer overhead and checkpoint cost of synergy-train.

Method (issue 4, "Benchmark"):
- scaling: the same run at 1 rank and at 2 ranks (1 thread each, gloo, `torchrun`), ZeRO-2, for the
  dense model (configs/tiny-cpu.yaml) and the MoE model (configs/tiny-moe-cpu.yaml, expert parallel
  size = number of ranks: ep=2 at 2 ranks, all experts local at 1 rank). Each rank keeps the same
  micro-batch and one micro-step per optimizer step (global batch = ranks x micro-batch: weak
  scaling). From RUN_DIR/metrics.jsonl (logged every step) the warm-up steps are dropped; per-rank
  throughput = bytes_per_s / world_size; scaling efficiency = per-rank throughput(2) / throughput(1).
  Next to it, each run is repeated with Trainer.train_step() timed inside every rank in process CPU
  time: cpu(1 rank) / cpu(2 ranks) is the efficiency without waiting (an upper bound on idle cores);
- trainer overhead: right after each 1-rank run, one process (1 thread) builds the Trainer from the
  same config and a plain torch AdamW loop over the same model and batches (same init seed, data
  stream, micro-batching, learning-rate schedule, gradient clipping), and alternates Trainer.train_step()
  (what step_time_s wraps) with the plain step; overhead = (trainer step - plain step) / trainer step,
  on the medians of process CPU time (wall clock reported too);
- checkpoint: a fresh process builds a Trainer (model + DeepSpeed engine, ZeRO-1, 1 rank), takes one
  training step on one short sequence (Adam creates its moments lazily; a real checkpoint has them)
  and times save (checkpoint.save_checkpoint, completion marker with CRC32 included), verification
  (find_latest_complete with CRC32) and load (checkpoint.load_checkpoint); size = bytes on disk of
  the checkpoint directory.
Scaling and checkpoint times are wall clock; the load average is recorded next to each figure
because the machine may be shared.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data_pipeline.stream import StreamingByteDataset
from synergy_dist.bench.loop import PlainLoop
from synergy_dist.bench.paths import REPO, resolve
from synergy_dist.bench.results import (
    BenchResults,
    Figure,
    Target,
    figure_from,
    missing,
    ratio,
)
from synergy_dist.bench.timing import rss_kib
from synergy_dist.checkpoint import store as ckpt
from synergy_dist.config import load_config
from synergy_dist.model.synergy import SynergyLM
from synergy_dist.train.data import sample_shards
from synergy_dist.train.metrics import read_metrics
from synergy_dist.train.seeding import seed_everything
from synergy_dist.train.trainer import Trainer

VARIANTS = ("dense", "moe")
SCALING_TARGET = 0.85  # per-rank throughput at 2 ranks / at 1 rank
OVERHEAD_TARGET_PERCENT = 5.0  # trainer step time beyond forward + backward + optimizer
RUN_TIMEOUT_S = 1800
CHECKPOINT_SEQ_LEN = 256  # bytes of the one training step taken before timing checkpoints
PARTS = ("checkpoint", "scaling")


@dataclass
class TrainBenchConfig:
    """Settings of one training benchmark run."""

    dense_config: str = "configs/tiny-cpu.yaml"  # YAML of the dense scaling/overhead model (relative: to the repo)
    moe_config: str = "configs/tiny-moe-cpu.yaml"  # YAML of the MoE model (its expert_parallel_size is set per run)
    parts: list[str] = field(default_factory=lambda: list(PARTS))  # "checkpoint" and/or "scaling" (+ overhead)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))  # which of "dense", "moe" to scale
    steps: int = 30  # optimizer steps per synergy-train run
    warmup_steps: int = 10  # first steps dropped from the medians (allocator, caches, DeepSpeed buckets)
    micro_batch_size: int = 0  # sequences per rank per step; 0 = the config's batch.micro_batch_size
    seq_len: int = 0  # bytes per sequence; 0 = the config's data.seq_len
    world_size: int = 2  # ranks of the parallel run (compared with 1 rank)
    overhead: bool = True  # time the plain training loop after each 1-rank run
    # also time Trainer.train_step() per rank in CPU time (the scaling on idle cores, waits excluded)
    cpu_scaling: bool = True
    # YAMLs whose checkpoints are timed
    checkpoint_configs: list[str] = field(default_factory=lambda: ["configs/tiny-cpu.yaml", "configs/base-100m.yaml"])
    checkpoint_repeats: int = 3  # save/verify/load cycles per checkpoint config
    checkpoint_zero_stage: int = 1  # ZeRO stage of the checkpoint engine (1 rank, fp32)
    sample_dir: str = ""  # where the bundled sample corpus is preprocessed ("" = the trainer's default cache)
    work_dir: str = "bench_out/train"  # run directories, configs and logs of every process

    def validate(self) -> None:
        if not self.parts or any(p not in PARTS for p in self.parts):
            raise ValueError(f"train benchmark: parts {self.parts} must be a non-empty subset of {list(PARTS)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"train benchmark: variants {unknown} are unknown; choose from {list(VARIANTS)}")
        if self.steps < 1 or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"train benchmark: need steps >= 1 and 0 <= warmup_steps < steps "
                             f"(got steps={self.steps}, warmup_steps={self.warmup_steps}); raise --train-steps")
        if self.micro_batch_size < 0:
            raise ValueError(f"train benchmark: micro_batch_size={self.micro_batch_size} must be >= 0 "
                             "(0 = the config's)")
        if self.world_size < 2:
            raise ValueError(f"train benchmark: world_size={self.world_size} must be >= 2 (it is compared with 1 rank)")
        if self.checkpoint_repeats < 1:
            raise ValueError(f"train benchmark: checkpoint_repeats={self.checkpoint_repeats} must be >= 1")
        for variant in self.variants:
            if not self.config_path(variant).is_file():
                raise FileNotFoundError(f"train benchmark: config {self.config_path(variant)} not found; set "
                                        f"{variant}_config to an existing YAML")
        for path in map(resolve, self.checkpoint_configs):
            if not path.is_file():
                raise FileNotFoundError(f"train benchmark: config {path} not found; pass an existing YAML "
                                        "with --checkpoint-config")

    def config_path(self, variant: str) -> Path:
        return resolve(self.dense_config if variant == "dense" else self.moe_config)


# ---------------------------------------------------------------------------------- arithmetic


def steady_records(records: list[dict], warmup_steps: int) -> list[dict]:
    """The metrics.jsonl records after the warm-up steps (steps are numbered from 1)."""
    return [r for r in records if r["step"] > warmup_steps]


def per_rank_bytes_per_s(records: list[dict]) -> list[float]:
    """Training bytes per second per rank of each record: the run's bytes_per_s / world_size."""
    return [r["bytes_per_s"] / r["world_size"] for r in records]


def scaling_efficiency(per_rank_parallel: float | None, per_rank_single: float | None) -> float | None:
    """Per-rank throughput with N ranks / throughput with 1 rank (1.0 = perfect weak scaling)."""
    return ratio(per_rank_parallel, per_rank_single)


def overhead_percent(trainer_step_s: float | None, plain_step_s: float | None) -> float | None:
    """Share of the trainer's step time not spent in the plain forward + backward + optimizer loop."""
    if trainer_step_s is None or plain_step_s is None or trainer_step_s <= 0:
        return None
    return 100.0 * (trainer_step_s - plain_step_s) / trainer_step_s


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------- synergy-train runs


def run_config(cfg: TrainBenchConfig, variant: str, world: int, run_dir: Path) -> dict:
    """The YAML of one timed run: the variant's config with the benchmark's settings over it."""
    values = yaml.safe_load(cfg.config_path(variant).read_text()) or {}

    def section(name: str) -> dict:
        return values.setdefault(name, {})

    micro = cfg.micro_batch_size or section("batch").get("micro_batch_size", 1)
    section("run")["dir"] = str(run_dir)
    section("batch").update(micro_batch_size=micro, global_batch_size=world * micro, global_batch_bytes=0)
    section("deepspeed")["zero_stage"] = 2
    if variant == "moe":
        section("deepspeed")["expert_parallel_size"] = world
    section("precision")["dtype"] = "fp32"
    # Same work per byte at every world size: a learned router's compression swings by 10x over the first
    # steps, along a path that depends on the global batch (so on the world size), and the per-byte compute
    # with it; measured, the 2-rank dense run made 3x more concepts than the 1-rank run over steps 21-30.
    # A fixed stride router at each stage's target compression times the same model at constant work.
    for stage in section("model").get("stages", []):
        router = stage.setdefault("router", {})
        router.update(kind="stride", stride=max(1, round(router.get("target_bytes_per_concept", 4.0))))
    section("train").update(max_steps=cfg.steps, eval_every_steps=0, sample_bytes=0, threads=1)
    section("checkpoint").update(every_steps=0, save_at_end=False, resume=False)
    section("log").update(every_steps=1, tensorboard=False, console=False)
    if cfg.seq_len:
        section("data")["seq_len"] = cfg.seq_len
    if cfg.sample_dir:
        section("data")["sample_dir"] = cfg.sample_dir
    return values


def write_config(values: dict, path: Path) -> Path:
    """Write the YAML and load it back through the trainer's validation (a bad value fails here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    load_config(str(path))
    return path


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(config_path: Path, world: int) -> list[str]:
    train = [str(Path(sys.executable).parent / "synergy-train"), "--config", str(config_path)]
    if world == 1:
        return train
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world),
            "--master_port", str(_free_port()), "--no-python", *train]


def launch(config_path: Path, world: int, steps: int) -> tuple[list[dict], str]:
    """Run synergy-train to the end; returns (metrics records, problem text or "").

    A run that logged all its steps but then exited non-zero (a crash while tearing down) keeps its
    records, and the problem text says so; a run that did not finish returns no records."""
    run_dir = Path(yaml.safe_load(config_path.read_text())["run"]["dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    log = config_path.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.run(train_command(config_path, world), cwd=str(REPO), env=child_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    records = read_metrics(run_dir / "metrics.jsonl")
    wrong = {r["world_size"] for r in records} - {world}
    if wrong:
        return [], f"metrics of {run_dir} report world_size {sorted(wrong)}, expected {world}"
    if proc.returncode != 0:
        finished = [r["step"] for r in records] == list(range(1, steps + 1))
        problem = (f"synergy-train ({world} rank(s)) exited with {proc.returncode}"
                   f"{' after logging all ' + str(steps) + ' steps' if finished else ''} (log: {log})")
        return (records if finished else []), problem
    return records, ""


# ---------------------------------------------------------------------------------- overhead (worker)


class PlainBaseline:
    """The model's forward + backward + torch AdamW step on the trainer's batches, no trainer around it
    (bench/loop.py): same config, init seed, data stream, micro-batching, learning-rate schedule and
    gradient clipping."""

    def __init__(self, cfg, steps: int):
        self.micro_steps = cfg.grad_accumulation_steps(1)
        sources = list(cfg.data.sources) or sample_shards(cfg, is_main=True)[0]
        data = StreamingByteDataset(sources, seq_len=cfg.data.seq_len, global_batch_size=cfg.global_batch_sequences(),
                                    micro_batch_size=cfg.batch.micro_batch_size, seed=cfg.seed, rank=0, world_size=1,
                                    pack=cfg.data.pack, on_corrupt=cfg.data.on_corrupt, batched=True)
        stream = iter(data)
        self.batches = [next(stream) for _ in range(steps * self.micro_steps)]  # read up front: only the model is timed
        seed_everything(cfg.seed)
        self.model = SynergyLM(cfg.model)
        self.model.train()
        self.loop = PlainLoop(self.model, self.model.param_groups(cfg.optim.weight_decay), cfg)

    def step(self, step: int) -> None:
        first = step * self.micro_steps
        self.loop.step(step, self.batches[first:first + self.micro_steps],
                       lambda batch: (self.model(batch["input_ids"], labels=batch["labels"]).loss, None))


def overhead_steps(config_path: str, run_dir: str, steps: int, warmup_steps: int) -> dict:
    """One process, one thread: the Trainer's own train_step() (what its step_time_s wraps) and the plain
    loop's step, alternately on the same step number, each timed in wall clock and process CPU time.
    Alternating makes both see the same machine load; CPU time is the work itself on a shared machine."""
    cfg = load_config(config_path, [f"run.dir={run_dir}"])
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    trainer._restart_data()
    plain = PlainBaseline(cfg, steps)
    times: dict[str, list[float]] = {"trainer_wall_s": [], "trainer_cpu_s": [], "plain_wall_s": [], "plain_cpu_s": [],
                                     "own_cpu_s": []}
    for step in range(steps):
        for name, run_step in (("trainer", trainer.train_step), ("plain", functools.partial(plain.step, step))):
            wall, cpu = time.perf_counter(), time.process_time()
            result = run_step()
            times[f"{name}_wall_s"].append(time.perf_counter() - wall)
            times[f"{name}_cpu_s"].append(time.process_time() - cpu)
            if name == "trainer":  # the step minus the engine's forward, backward and optimizer calls
                phases = result.phases
                times["own_cpu_s"].append(phases["cpu_data_s"] + phases["cpu_other_s"])
    if dist.is_initialized():
        dist.destroy_process_group()
    return {key: values[warmup_steps:] for key, values in times.items()}


def rank_steps(config_path: str, run_dir: str, steps: int, warmup_steps: int) -> dict | None:
    """Every rank (under torchrun, or alone) times Trainer.train_step() in wall clock and process CPU
    time; rank 0 returns every rank's steady steps. A rank's CPU time is its own work (compute and the
    CPU side of communication) without the time it was descheduled or blocked waiting for the others
    (assuming gloo's waits block rather than spin): cpu(1 rank) / cpu(N ranks) bounds from above the
    scaling efficiency on idle cores."""
    cfg = load_config(config_path, [f"run.dir={run_dir}"])
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    trainer._restart_data()
    wall, cpu = [], []
    for _ in range(steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train_step()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    mine = {"wall_s": wall[warmup_steps:], "cpu_s": cpu[warmup_steps:]}
    ranks = [mine]
    if dist.is_initialized():
        if trainer.world > 1:
            ranks = [None] * trainer.world
            dist.all_gather_object(ranks, mine)
        dist.destroy_process_group()
    return {"ranks": ranks} if trainer.rank == 0 else None


# ---------------------------------------------------------------------------------- checkpoint (worker)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def checkpoint_costs(config_path: str, run_dir: str, zero_stage: int, repeats: int, sample_dir: str) -> dict:
    """Build a Trainer (model + engine) once, take one training step on a single short sequence (so the
    Adam moments exist, as in any real checkpoint: they are created lazily), then save / verify / load
    its checkpoint `repeats` times. The short sequence changes no parameter shape (Mamba + NoPE)."""
    overrides = [f"run.dir={run_dir}", f"deepspeed.zero_stage={zero_stage}", "precision.dtype=fp32",
                 "train.eval_every_steps=0", "train.sample_bytes=0", "train.threads=1", "checkpoint.resume=false",
                 "log.tensorboard=false", "log.console=false", f"data.seq_len={CHECKPOINT_SEQ_LEN}",
                 "batch.global_batch_bytes=0", "batch.global_batch_size=1", "batch.micro_batch_size=1"]
    if sample_dir:
        overrides.append(f"data.sample_dir={sample_dir}")
    cfg = load_config(config_path, overrides)
    torch.set_num_threads(1)
    started = time.perf_counter()
    trainer = Trainer(cfg)
    build_s = time.perf_counter() - started
    trainer._restart_data()
    trainer.train_step()
    root = Path(run_dir) / "checkpoints"
    result = {"params": sum(p.numel() for p in trainer.model.parameters()), "build_s": build_s,
              "save_s": [], "verify_s": [], "load_s": [], "bytes": [], "files": []}
    for repeat in range(repeats):
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        path = ckpt.save_checkpoint(trainer.engine, root, repeat + 1, trainer._trainer_state(), 0, 1)
        result["save_s"].append(time.perf_counter() - started)
        result["bytes"].append(directory_bytes(path))
        result["files"].append(sum(1 for f in path.rglob("*") if f.is_file()))
        started = time.perf_counter()
        found = ckpt.find_latest_complete(root, verify_files=True)
        result["verify_s"].append(time.perf_counter() - started)
        if found != path:
            raise RuntimeError(f"checkpoint {path} was not found complete after saving (found {found})")
        started = time.perf_counter()
        ckpt.load_checkpoint(trainer.engine, path, 0, 1)
        result["load_s"].append(time.perf_counter() - started)
    shutil.rmtree(root, ignore_errors=True)
    result["peak_rss_mib"] = rss_kib("VmHWM") / 1024
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def worker_main() -> None:
    """Entry of a worker process: argv[1] is {"job": "overhead"|"checkpoint", "kwargs": {...}}; prints JSON."""
    job = json.loads(sys.argv[1])
    task = {"overhead": overhead_steps, "checkpoint": checkpoint_costs, "ranks": rank_steps}[job["job"]]
    result = task(**job["kwargs"])
    if result is not None:  # rank 0 (or the only process) answers
        print(json.dumps(result), flush=True)


def run_worker(job: str, kwargs: dict, log: Path, world: int = 1) -> tuple[dict | None, str]:
    code = "from synergy_dist.bench.train import worker_main; worker_main()"
    argv = [sys.executable, "-c", code, json.dumps({"job": job, "kwargs": kwargs})]
    if world > 1:
        argv = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world),
                "--master_port", str(_free_port()), "--no-python", *argv]
    proc = subprocess.run(argv, cwd=str(REPO), env=child_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"{job} worker exited with {proc.returncode}: {tail} (log: {log})"
    if proc.returncode != 0:  # it answered, then crashed while tearing down: keep the answer, say so
        return json.loads(lines[-1]), f"{job} worker exited with {proc.returncode} after answering (log: {log})"
    return json.loads(lines[-1]), ""


# ---------------------------------------------------------------------------------- the benchmark


def measure_checkpoints(cfg: TrainBenchConfig, report: BenchResults, work: Path) -> None:
    for config in cfg.checkpoint_configs:
        name = Path(config).stem
        load = load_average()
        result, error = run_worker("checkpoint", {
            "config_path": str(resolve(config)), "run_dir": str(work / f"checkpoint-{name}"),
            "zero_stage": cfg.checkpoint_zero_stage, "repeats": cfg.checkpoint_repeats,
            "sample_dir": cfg.sample_dir}, work / f"checkpoint-{name}.log")
        if result is None:
            for what, unit in (("save", "s"), ("load", "s"), ("size", "MB")):
                report.add(missing(f"checkpoint/{name}/{what}", unit, error))
            continue
        if error:
            report.notes.append(error)
        how = (f"{config}: {result['params']:,} parameters, ZeRO-{cfg.checkpoint_zero_stage}, 1 rank, fp32; "
               f"load average {load} -> {load_average()}")
        report.add(figure_from(f"checkpoint/{name}/params", [result["params"]], "", f"model parameters of {config}"))
        report.add(figure_from(f"checkpoint/{name}/save", result["save_s"], "s",
                               "save_checkpoint after one training step (DeepSpeed files + RNG + trainer state + "
                               f"CRC32 marker); {how}"))
        report.add(figure_from(f"checkpoint/{name}/verify", result["verify_s"], "s",
                               "find_latest_complete: sizes + CRC32 of every file (what a resume does first)"))
        report.add(figure_from(f"checkpoint/{name}/load", result["load_s"], "s",
                               "load_checkpoint: model + optimizer state + RNG into the built engine"))
        report.add(figure_from(f"checkpoint/{name}/size", [b / 1e6 for b in result["bytes"]], "MB",
                               f"bytes on disk of the checkpoint directory ({result['files'][0]} files); "
                               f"process peak RSS {result['peak_rss_mib']:,.0f} MiB"))


def measure_variant(cfg: TrainBenchConfig, variant: str, report: BenchResults, work: Path) -> None:
    per_rank: dict[int, float | None] = {}
    cpu_per_rank: dict[int, float | None] = {}
    for world in (1, cfg.world_size):
        key = f"{variant}/zero2_{world}rank"
        values = run_config(cfg, variant, world, work / f"{variant}-{world}rank")
        config_path = write_config(values, work / f"{variant}-{world}rank.yaml")
        load = load_average()
        records, error = launch(config_path, world, cfg.steps)
        if records and error:
            report.notes.append(f"{variant}, {world} rank(s): {error}; its figures use the logged steps")
        steady = steady_records(records, cfg.warmup_steps)
        if not steady:
            reason = error or f"no steps after the {cfg.warmup_steps} warm-up steps in {config_path}"
            report.add(missing(f"{key}/bytes_per_s_per_rank", "B/s", reason))
            per_rank[world] = None
            continue
        ep = f", expert parallel {world}" if variant == "moe" else ""
        detail = (f"{cfg.config_path(variant).name}, {world} rank(s) x 1 thread{ep}, micro-batch "
                  f"{values['batch']['micro_batch_size']} x {values.get('data', {}).get('seq_len', 'default')} bytes "
                  f"per rank, steps {cfg.warmup_steps + 1}-{cfg.steps}; load average {load} -> {load_average()}")
        per_rank[world] = report.add(figure_from(f"{key}/bytes_per_s_per_rank", per_rank_bytes_per_s(steady),
                                                 "B/s", f"bytes_per_s / world_size from metrics.jsonl; {detail}")).value
        report.add(figure_from(f"{key}/step_time", [r["step_time_s"] for r in steady], "s",
                               "trainer step_time_s (wall clock)"))
        if world == 1 and cfg.overhead:
            measure_overhead(cfg, variant, config_path, report, work)
        if cfg.cpu_scaling:
            cpu_per_rank[world] = measure_rank_cpu(cfg, key, config_path, world, report, work)
    if cfg.cpu_scaling:
        efficiency = scaling_efficiency(cpu_per_rank.get(1), cpu_per_rank.get(cfg.world_size))
        report.add(Figure(f"{variant}/scaling_efficiency_cpu", efficiency, "x",
                          [] if efficiency is None else [efficiency],
                          f"CPU time per step and rank, 1 rank / {cfg.world_size} ranks: the efficiency on idle cores "
                          "if waiting for the other ranks cost nothing (an upper bound; not the target)"))
    report.targets.append(Target(f"{variant} ZeRO-2{' + expert parallel' if variant == 'moe' else ''}: scaling "
                                 f"efficiency, per-rank bytes/s {cfg.world_size} ranks / 1 rank",
                                 scaling_efficiency(per_rank.get(cfg.world_size), per_rank.get(1)), ">=",
                                 SCALING_TARGET))


def measure_rank_cpu(cfg: TrainBenchConfig, key: str, config_path: Path, world: int, report: BenchResults,
                     work: Path) -> float | None:
    """Median CPU seconds per step and rank of Trainer.train_step(), every rank's steady steps pooled."""
    name = config_path.stem
    load = load_average()
    result, error = run_worker("ranks", {"config_path": str(config_path), "run_dir": str(work / f"{name}-cpu"),
                                         "steps": cfg.steps, "warmup_steps": cfg.warmup_steps},
                               work / f"{name}-cpu.log", world=world)
    if result is None:
        report.add(missing(f"{key}/step_cpu_per_rank", "s", error))
        return None
    if error:
        report.notes.append(error)
    samples = [t for rank in result["ranks"] for t in rank["cpu_s"]]
    return report.add(figure_from(f"{key}/step_cpu_per_rank", samples, "s",
                                  f"Trainer.train_step() timed in each of {world} rank process(es) (CPU time, every "
                                  f"rank's steps {cfg.warmup_steps + 1}-{cfg.steps}); load average {load} -> "
                                  f"{load_average()}")).value


def measure_overhead(cfg: TrainBenchConfig, variant: str, config_path: Path, report: BenchResults, work: Path) -> None:
    load = load_average()
    result, error = run_worker("overhead", {"config_path": str(config_path),
                                            "run_dir": str(work / f"{variant}-overhead"),
                                            "steps": cfg.steps, "warmup_steps": cfg.warmup_steps},
                               work / f"{variant}-overhead.log")
    goal = f"{variant}: trainer overhead (1 rank, ZeRO-2) beyond forward + backward + optimizer"
    if result is None:
        report.add(missing(f"{variant}/trainer_overhead", "%", error))
        report.targets.append(Target(goal, None, "<", OVERHEAD_TARGET_PERCENT, "%"))
        return
    if error:
        report.notes.append(error)
    how = (f"1 process x 1 thread, Trainer.train_step() and the plain loop alternating step by step, steps "
           f"{cfg.warmup_steps + 1}-{cfg.steps}; load average {load} -> {load_average()}")
    medians = {}
    whats = (("trainer", "Trainer.train_step() (1 rank, ZeRO-2, DeepSpeed engine, data loader, safeguards)"),
             ("plain", "plain loop: same model, batches, micro-batching, schedule and clipping, torch AdamW"))
    for name, what in whats:
        medians[name] = report.add(figure_from(f"{variant}/{name}_step_cpu", result[f"{name}_cpu_s"], "s",
                                               f"{what}: process CPU time; {how}")).value
        medians[name + "_wall"] = report.add(figure_from(f"{variant}/{name}_step_wall", result[f"{name}_wall_s"], "s",
                                                         "the same, wall clock")).value
    own = [100.0 * o / t for o, t in zip(result["own_cpu_s"], result["trainer_cpu_s"])]
    report.add(figure_from(f"{variant}/trainer_overhead", own, "%",
                           "judged: (Trainer.train_step() - the DeepSpeed engine's forward, backward and step calls) / "
                           "Trainer.train_step(), per step (the trainer's phase clock, CPU time): data loading, "
                           "safeguards, loss averaging, bookkeeping"))
    share = overhead_percent(medians["trainer"], medians["plain"])
    report.add(Figure(f"{variant}/engine_and_trainer_vs_plain", share, "%", [] if share is None else [share],
                      "not the target: (trainer step - plain torch step) / trainer step, medians of CPU time; "
                      "includes what DeepSpeed's engine and ZeRO optimizer add to forward/backward/step"))
    wall_share = overhead_percent(medians["trainer_wall"], medians["plain_wall"])
    report.add(Figure(f"{variant}/engine_and_trainer_vs_plain_wall", wall_share, "%",
                      [] if wall_share is None else [wall_share], "the same from the wall-clock medians"))
    report.targets.append(Target(goal, report.value(f"{variant}/trainer_overhead"), "<", OVERHEAD_TARGET_PERCENT, "%"))


def use_every_core() -> set[int]:
    """Undo a one-core pin (the data and model benchmarks pin the process, and children inherit it):
    the N-rank runs need N cores. Returns the CPUs this process may now use."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:  # a cpuset narrower than cpu_count: keep what we have
        pass
    return os.sched_getaffinity(0)


def run(cfg: TrainBenchConfig, command: str) -> BenchResults:
    cfg.validate()
    report = BenchResults(name="train", command=command)
    cpus = use_every_core()
    if len(cpus) < cfg.world_size:
        report.notes.append(f"only CPUs {sorted(cpus)} are available: {cfg.world_size} ranks share them, the "
                            "scaling figures measure that sharing")
    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report.notes.append(
        f"synergy-train in real processes (1 thread each, DS_ACCELERATOR=cpu, gloo; {cfg.world_size} ranks through "
        f"torchrun), {cfg.steps} steps per run, the first {cfg.warmup_steps} dropped, medians of the rest; every "
        "rank keeps its micro-batch (global batch = ranks x micro-batch, one micro-step per step); fp32; "
        "the bundled sample corpus; runs, configs and logs in " + str(work))
    # Checkpoints first, scaling last: the scaling runs need both cores, so they go when the load is lowest.
    if "checkpoint" in cfg.parts:
        measure_checkpoints(cfg, report, work)
    for variant in cfg.variants if "scaling" in cfg.parts else []:
        measure_variant(cfg, variant, report, work)
    report.notes.append("scaling and checkpoint times are wall clock: on a shared machine they include other "
                        "processes' turns; compare the load averages given with each figure (2 ranks need 2 idle "
                        "cores); the overhead target is judged on process CPU time (1 thread: the work itself)")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-part", action="append", default=None, choices=PARTS,
                        help="what to measure: checkpoint (save/load), scaling (1 vs N ranks + trainer overhead) "
                             "(default: both)")
    parser.add_argument("--train-variant", action="append", default=None, choices=VARIANTS,
                        help="scaling run(s): dense (ZeRO-2), moe (ZeRO-2 + expert parallel) (default: both)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="optimizer steps per synergy-train run (default 30)")
    parser.add_argument("--train-warmup-steps", type=int, default=None,
                        help="first steps dropped from the medians (default 10)")
    parser.add_argument("--train-micro-batch", type=int, default=None,
                        help="sequences per rank per step in the scaling runs "
                             "(default: each config's micro_batch_size)")
    parser.add_argument("--checkpoint-config", action="append", default=None, metavar="YAML",
                        help="config(s) whose checkpoint save/load is timed (default: configs/tiny-cpu.yaml and "
                             "configs/base-100m.yaml)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the plain-loop overhead measurement")
    parser.add_argument("--no-cpu-scaling", action="store_true",
                        help="skip the per-rank CPU-time runs (the idle-core scaling bound)")


def config_from_args(args: argparse.Namespace) -> TrainBenchConfig:
    cfg = TrainBenchConfig()
    if getattr(args, "quick", False):  # a smoke run of the harness: few steps, the tiny checkpoint only
        cfg.steps, cfg.warmup_steps, cfg.checkpoint_repeats = 4, 1, 1
        cfg.checkpoint_configs = ["configs/tiny-cpu.yaml"]
    if getattr(args, "train_part", None):
        cfg.parts = list(args.train_part)
    if getattr(args, "train_variant", None):
        cfg.variants = list(args.train_variant)
    if getattr(args, "train_steps", None) is not None:
        cfg.steps = args.train_steps
    if getattr(args, "train_warmup_steps", None) is not None:
        cfg.warmup_steps = args.train_warmup_steps
    if getattr(args, "train_micro_batch", None) is not None:
        cfg.micro_batch_size = args.train_micro_batch
    if getattr(args, "checkpoint_config", None):
        cfg.checkpoint_configs = list(args.checkpoint_config)
    if getattr(args, "no_overhead", False):
        cfg.overhead = False
    if getattr(args, "no_cpu_scaling", False):
        cfg.cpu_scaling = False
    out = getattr(args, "out", None)
    if out:
        cfg.work_dir = str(Path(out) / "train")
    return cfg
