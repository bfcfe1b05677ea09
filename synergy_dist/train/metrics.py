"""Metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, TensorBoard when installed, Weights &
Biases when asked for (log.wandb), and a console progress line with throughput and ETA. Only rank 0 writes.

The W&B run's id is kept in RUN_DIR/wandb_run_id, so a restarted or requeued run resumes the same W&B run."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml

WANDB_ID_FILE = "wandb_run_id"  # in the run directory: the W&B run that a restart resumes


def to_number(value: Any) -> Any:
    """Tensors -> floats / lists of floats, so every metric is JSON-serialisable."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class WandbRun:
    """Sends metrics records to one Weights & Biases run (its files under RUN_DIR/wandb), resuming the run whose id
    RUN_DIR/wandb_run_id holds; the training config (RUN_DIR/config.yaml) becomes the W&B run config."""

    def __init__(self, run_dir: Path, project: str, name: str):
        import wandb  # optional dependency (the wandb extra); config validation checked that it imports

        id_file = run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        config_file = run_dir / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
        self.run = wandb.init(project=project, name=name or run_dir.resolve().name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config)

    def log(self, step: int, record: dict) -> None:
        """The record's numbers (as TensorBoard gets them; lists such as expert loads stay in metrics.jsonl)."""
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, max_steps: int, tensorboard: bool = True, console: bool = True,
                 wandb_project: str | None = None, wandb_run_name: str = ""):
        """wandb_project: also send every record to that W&B project (None: no W&B)."""
        self.enabled = enabled
        self.max_steps = max_steps
        self.console = console and enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.started = time.time()
        self.start_step: int | None = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency (the tensorboard extra)

                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None
        self.wandb = WandbRun(run_dir, wandb_project, wandb_run_name) if enabled and wandb_project else None

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: to_number(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(step, record)
        if self.console and console:
            print(self.progress_line(step, record), file=sys.stderr, flush=True)

    def progress_line(self, step: int, record: dict) -> str:
        if self.start_step is None:
            self.start_step, self.started = step - 1, time.time() - record.get("step_time_s", 0.0)
        elapsed = time.time() - self.started
        done = max(1, step - self.start_step)
        eta = elapsed / done * (self.max_steps - step)
        parts = [f"step {step}/{self.max_steps}", f"loss {record.get('loss', float('nan')):.4f}",
                 f"bpb {record.get('bpb', float('nan')):.4f}"]
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if "bytes_per_s" in record:
            parts.append(f"{record['bytes_per_s'] / 1e3:.1f} kB/s")
        if "bytes_per_concept" in record:
            parts.append(f"{record['bytes_per_concept']:.2f} B/concept")
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.2f}%")
        if record.get("skipped_steps"):
            parts.append(f"skipped {record['skipped_steps']}")
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def event(self, text: str) -> None:
        """A one-off message (alarm, checkpoint, rollback) on the console and in events.log."""
        if not self.enabled:
            return
        print(text, file=sys.stderr, flush=True)
        with open(self.path.with_name("events.log"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl (used by tests and reports)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
