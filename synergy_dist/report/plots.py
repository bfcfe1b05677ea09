"""PNG plots of a run's RUN_DIR/metrics.jsonl.

Each plot function takes the records (one per logged step, see docs/TRAINING.md "Metrics") and a
path, writes the PNG and returns the series it drew, so tests can compare them with the metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from synergy_dist.report import ReportError, require_matplotlib, save_png

MOE_LOAD = re.compile(r"^moe/(.+)/tokens_per_expert$")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl, one per step (a resumed run logs some steps twice: the last wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found; pass a run directory written by synergy-train")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    if not by_step:
        raise ReportError(f"{path} is empty: the run has not logged a step yet")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have key."""
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_bpb(records: list[dict], seq_len: int, path: Path) -> dict:
    """Train and validation bits per byte against training bytes seen (samples consumed x seq_len)."""
    plt = require_matplotlib()
    seen = {r["step"]: r.get("samples_consumed", 0) * seq_len for r in records}
    train_steps, train = series(records, "bpb")
    valid_steps, valid = series(records, "eval_bpb")
    drawn = {"train": ([seen[s] for s in train_steps], train), "valid": ([seen[s] for s in valid_steps], valid)}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*drawn["train"], label="train", lw=1)
    if valid:
        ax.plot(*drawn["valid"], "o-", label="validation")
    ax.set(xlabel="training bytes seen", ylabel="bits per byte", title="bits per byte")
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)
    return drawn


def plot_lr(records: list[dict], path: Path) -> dict:
    plt = require_matplotlib()
    steps, lr = series(records, "lr")
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, lr)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    save_png(fig, path)
    return {"lr": (steps, lr)}


def plot_compression(records: list[dict], targets: list[float], path: Path) -> dict:
    """Realised bytes per concept of each stage (cumulative) with its target (product of the targets)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = {}
    cumulative_target = 1.0
    for s, target in enumerate(targets):
        cumulative_target *= target
        steps, values = series(records, f"stage{s}/bytes_per_concept")
        drawn[f"stage{s}"] = (steps, values)
        line, = ax.plot(steps, values, label=f"stage {s}")
        ax.axhline(cumulative_target, color=line.get_color(), ls="--", lw=0.8, label=f"stage {s} target")
    if not targets:
        ax.text(0.5, 0.5, "no router stages (byte-level model)", ha="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="bytes per concept", title="realised compression")
    if targets:
        ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)
    return drawn


def expert_loads(records: list[dict]) -> dict[str, tuple[list[int], np.ndarray]]:
    """Per MoE layer: (steps, load share of each expert at each step), shares summing to 1 per step."""
    layers: dict[str, tuple[list[int], list]] = {}
    for r in records:
        for key, value in r.items():
            match = MOE_LOAD.match(key)
            if match and isinstance(value, list):
                steps, rows = layers.setdefault(match.group(1), ([], []))
                counts = np.asarray(value, dtype=np.float64)
                steps.append(r["step"])
                rows.append(counts / max(counts.sum(), 1e-12))
    return {name: (steps, np.stack(rows)) for name, (steps, rows) in sorted(layers.items())}


def plot_expert_load(records: list[dict], path: Path) -> dict:
    """One heatmap per MoE layer: experts x steps, colour = that expert's share of the layer's tokens."""
    plt = require_matplotlib()
    loads = expert_loads(records)
    fig, axes = plt.subplots(max(len(loads), 1), 1, figsize=(8, 1.2 + 1.6 * max(len(loads), 1)), squeeze=False)
    if not loads:
        axes[0, 0].text(0.5, 0.5, "no MoE layers in this run", ha="center", transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
    for ax, (name, (steps, shares)) in zip(axes[:, 0], loads.items()):
        image = ax.imshow(shares.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, shares.shape[1] - 0.5, -0.5))
        ax.set(ylabel="expert", title=f"{name}: share of tokens per expert")
        fig.colorbar(image, ax=ax)
    axes[-1, 0].set_xlabel("step")
    save_png(fig, path)
    return loads


def plot_skipped(records: list[dict], path: Path) -> dict:
    """Cumulative skipped updates, with the skipped steps marked (and their reasons)."""
    plt = require_matplotlib()
    steps, total = series(records, "skipped_steps")
    skipped = [(r["step"], r.get("skip_reason") or "") for r in records if r.get("skipped")]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.step(steps, total, where="post", label="skipped updates (cumulative)")
    if skipped:
        ax.plot([s for s, _ in skipped], [total[steps.index(s)] for s, _ in skipped], "rx", label="skipped step")
    ax.set(xlabel="step", ylabel="skipped updates", title=f"skipped steps: {total[-1] if total else 0}")
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)
    return {"cumulative": (steps, total), "skipped": skipped}


def plot_run(run_dir: Path, output: Path, seq_len: int, targets: list[float]) -> dict[str, Path]:
    """Every plot of a run into output/; returns {name: png path}."""
    records = read_metrics(run_dir)
    paths = {name: output / f"{name}.png" for name in ("bpb", "lr", "compression", "expert_load", "skipped")}
    plot_bpb(records, seq_len, paths["bpb"])
    plot_lr(records, paths["lr"])
    plot_compression(records, targets, paths["compression"])
    plot_expert_load(records, paths["expert_load"])
    plot_skipped(records, paths["skipped"])
    return paths
