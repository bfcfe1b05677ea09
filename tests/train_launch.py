"""Shared helpers of the trainer tests: a tiny config, launching synergy-train in real processes
(single, `deepspeed` launcher, `torchrun`), and reading metrics.jsonl."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A model of a few thousand parameters: one cosine-router stage (attention + Mamba), small middle.
TINY_MODEL = {
    "stages": [{
        "d_model": 32,
        "encoder": {"pattern": "M", "n_heads": 2, "mlp_ratio": 2.0,
                    "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 16}},
        "decoder": {"pattern": "M", "n_heads": 2, "mlp_ratio": 2.0,
                    "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 16}},
        "router": {"kind": "cosine", "target_bytes_per_concept": 3.0},
    }],
    "d_middle": 48,
    "middle": {"pattern": "A", "repeat": 2, "n_heads": 2, "mlp_ratio": 2.0, "pos_encoding": "none"},
}

TINY_MOE_MIDDLE = {"pattern": "A", "repeat": 2, "n_heads": 2, "mlp_ratio": 2.0, "pos_encoding": "none",
                   "moe_every": 1, "moe": {"n_experts": 4, "top_k": 2, "d_ff": 32}}


def tiny_config(run_dir: Path, sample_dir: Path, moe: bool = False, **sections) -> dict:
    cfg = {
        "run": {"dir": str(run_dir)},
        "model": json.loads(json.dumps(TINY_MODEL)),
        "data": {"seq_len": 64, "sample_dir": str(sample_dir)},
        "schedule": {"warmup_steps": 2},
        "batch": {"global_batch_size": 4, "micro_batch_size": 1},
        "train": {"max_steps": 6, "lr": 3e-3, "sample_bytes": 0},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "log": {"every_steps": 1, "tensorboard": False},
    }
    if moe:
        cfg["model"]["middle"] = json.loads(json.dumps(TINY_MOE_MIDDLE))
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return env


def command(config_path: Path, launcher: str, nproc: int, overrides: list[str]) -> list[str]:
    train = [str(BIN / "synergy-train"), "--config", str(config_path), *overrides]
    if launcher == "single":
        return train
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port,
                str(REPO / "synergy_dist" / "cli" / "train.py"), "--config", str(config_path), *overrides]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, "--no-python", *train]
    raise ValueError(launcher)


INTERPRETER = re.compile(rb"python[0-9.]*")

# Every run start() launched, so that conftest.py can end the ones a failed test left running.
STARTED: list[subprocess.Popen] = []
STARTED_PORTS: list[str] = []


def start(cfg: dict, launcher: str = "single", nproc: int = 1, overrides: list[str] | None = None) -> subprocess.Popen:
    run_dir = Path(cfg["run"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir.parent / f"{run_dir.name}.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    cmd = command(config_path, launcher, nproc, overrides or [])
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    STARTED.append(proc)
    if "--master_port" in cmd:
        STARTED_PORTS.append(cmd[cmd.index("--master_port") + 1])
    return proc


def end_started_runs() -> None:
    """kill -9 every run a test started and left running, and remove the DeepSpeed shared-memory buffers
    its killed ranks left behind (tests run one at a time, so a buffer is stale once its run has ended)."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            kill_group(proc)
    for port in STARTED_PORTS:
        # DeepSpeed's CPU all-reduce keeps a 69 MB buffer per rank in /dev/shm, named after the master port;
        # a killed rank cannot remove its own, and a full /dev/shm slows every later run.
        for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            buffer.unlink(missing_ok=True)
    STARTED_PORTS.clear()


def output_of(cfg: dict) -> str:
    run_dir = Path(cfg["run"]["dir"])
    path = run_dir.parent / f"{run_dir.name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def run(cfg: dict, launcher: str = "single", nproc: int = 1, overrides: list[str] | None = None,
        timeout: float = 300) -> int:
    proc = start(cfg, launcher, nproc, overrides)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        kill_group(proc)
        raise AssertionError(f"run timed out; output:\n{output_of(cfg)[-4000:]}") from err


def metrics(cfg: dict) -> list[dict]:
    path = Path(cfg["run"]["dir"]) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(cfg: dict) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in metrics(cfg)}


def wait_for_step(proc: subprocess.Popen, cfg: dict, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in metrics(cfg)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before step {step}:\n{output_of(cfg)[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def descendants(pid: int) -> list[int]:
    """Every process below pid (launchers put their ranks in new sessions, so killpg is not enough)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(table[::2], table[1::2]):
        children.setdefault(int(parent), []).append(int(child))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pids(proc: subprocess.Popen) -> list[int]:
    """The training processes: proc itself, or the launcher's descendants running synergy-train."""
    pids = [proc.pid] + descendants(proc.pid)
    ranks = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # the interpreter (python, python3, python3.11: a fresh venv's scripts name the versioned one) and -u go
        program = [a for a in argv[:3] if not (INTERPRETER.fullmatch(a.rsplit(b"/", 1)[-1]) or a == b"-u")][:1]
        if program and program[0].endswith((b"synergy-train", b"cli/train.py")):
            ranks.append(pid)
    return ranks


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """kill -9 the run: every rank and the launcher."""
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait()
