"""Multi-node without SLURM: `deepspeed --hostfile --no_ssh` and `torchrun --nnodes`, with an explicit master
address and port. Two launchers on this machine, one rank each, stand in for two nodes (docs/CLUSTER.md).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRAIN = str(VENV_BIN / "synergy-train")
TOTAL_STEPS = 4
TRAIN_ARGS = ["--config", str(REPO / "configs" / "tiny-cpu.yaml"), f"train.max_steps={TOTAL_STEPS}",
              "checkpoint.every_steps=2", "log.every_steps=1", "train.eval_every_steps=0", "train.sample_bytes=0",
              "batch.micro_batch_size=4"]
TIMEOUT_S = 420


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so no outgoing connection takes it before the master binds."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(15000, 30000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 15000-30000")


def node_env() -> dict[str, str]:
    """A clean launcher environment: CPU + gloo, one thread per rank, nothing inherited from a SLURM job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                     "MASTER_", "OMPI_", "PMI_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_two_nodes(commands: list[list[str]], cwd: Path) -> list[str]:
    """Start one launcher per stand-in node at the same time; return their outputs, failing on a non-zero exit."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for node, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n{out[-4000:]}"
    return outputs


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_two_rank_run(run_dir: Path) -> list[float]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
    assert {r["world_size"] for r in rows} == {2}
    assert (run_dir / "checkpoints" / f"step_{TOTAL_STEPS:08d}").is_dir()
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def torchrun_losses(tmp_path_factory) -> list[float]:
    work = tmp_path_factory.mktemp("torchrun")
    run_dir = work / "run"
    port = free_port()
    commands = [[str(VENV_BIN / "torchrun"), "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                 "--master_addr=127.0.0.1", f"--master_port={port}", TRAIN, *TRAIN_ARGS, f"run.dir={run_dir}"]
                for node in (0, 1)]
    run_two_nodes(commands, work)
    return assert_two_rank_run(run_dir)


def test_torchrun_two_nodes_with_explicit_master(torchrun_losses):
    assert len(torchrun_losses) == TOTAL_STEPS and all(loss > 0 for loss in torchrun_losses)


def test_deepspeed_hostfile_two_nodes_without_ssh_matches_torchrun(tmp_path, torchrun_losses):
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    # Host names are labels here: with --no_ssh each launcher starts only its own node's ranks.
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    commands = [[str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={node}",
                 "--master_addr=127.0.0.1", f"--master_port={port}", TRAIN, *TRAIN_ARGS, f"run.dir={run_dir}"]
                for node in (0, 1)]
    run_two_nodes(commands, tmp_path)
    # Same config, seed and world size through another launcher: the same training, step for step.
    assert assert_two_rank_run(run_dir) == torchrun_losses
