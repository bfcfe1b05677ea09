"""Shared by the evaluation, generation and report tests: one real 2-rank training run (MoE middle,
expert parallel over both ranks) made once per test session and reused by every module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import train_launch as tl

BIN = Path(sys.executable).parent
STEPS = 4


def trained_run(base: Path) -> dict:
    """The config of a finished run under base (trained on first use: ~20 s on 2 cores)."""
    cfg = tl.tiny_config(base / "moe_ep2", base / "sample_shards", moe=True,
                         train={"max_steps": STEPS, "lr": 3e-3, "sample_bytes": 0, "eval_every_steps": 2,
                                "eval_batches": 0},  # the whole validation set: comparable with synergy-eval
                         deepspeed={"zero_stage": 0, "expert_parallel_size": 2})
    run_dir = Path(cfg["run"]["dir"])
    if not (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file():
        status = tl.run(cfg, "torchrun", 2)
        assert status == 0, tl.output_of(cfg)[-4000:]
    return cfg


def exported(cfg: dict) -> Path:
    """The run's newest checkpoint through synergy-export (made once)."""
    run_dir = Path(cfg["run"]["dir"])
    out = run_dir.parent / "moe_ep2_export"
    if not (out / "model.safetensors").is_file():
        from synergy_dist.export import export

        export(run_dir, out)
    return out


def cli(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run a console script in a real process with one thread."""
    return subprocess.run([str(BIN / name), *args], input=stdin, env=tl.child_env(), capture_output=True,
                          text=True, timeout=300)
