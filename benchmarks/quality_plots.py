"""PNG plots of the quality comparison (`python -m benchmarks.quality`), from the rows' result JSON.

Each function writes one PNG and returns the numbers it drew, so that tests compare them with the
results instead of only checking that a file exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synergy_dist.report import require_matplotlib, save_png

PYDOCS_SET, CODE_SET = "pydocs-valid", "pystdlib-code-heldout"  # the evaluation sets of benchmarks/quality.py
SMOOTH_STEPS = 25  # moving-average window of the training curves


def _label(result: dict) -> str:
    return f"{result['number']} {result['row']}"


def _ordered(results: dict[str, dict], order: list[str]) -> list[dict]:
    return [results[name] for name in order if name in results]


def train_bytes_per_unit(result: dict) -> float:
    """Training bytes per training unit: 1 for byte rows; for BPE, the bytes its training tokens covered
    divided by those tokens (steps x batch x tokens per window)."""
    units = result["steps"] * result["batch_size"] * result["seq_len_units"]
    return result["train_bytes"] / units


def smoothed(values: list[float], window: int = SMOOTH_STEPS) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    x = np.asarray(values, dtype=np.float64)
    csum = np.concatenate(([0.0], np.cumsum(x)))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_bits_per_byte(results: dict[str, dict], order: list[str], path: Path) -> dict[str, tuple[float, float | None]]:
    """Dots (not bars: the differences are a few percent of the values): pydocs-valid and held-out code
    bits per byte for each row."""
    plt = require_matplotlib()
    rows = _ordered(results, order)
    drawn = {r["row"]: (r["eval"][PYDOCS_SET]["bits_per_byte"], r["eval"].get(CODE_SET, {}).get("bits_per_byte"))
             for r in rows}
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    prose = [drawn[r["row"]][0] for r in rows]
    code = [drawn[r["row"]][1] for r in rows]
    ax.plot(prose, y, "o", label="pydocs-valid")
    ax.plot([c if c is not None else np.nan for c in code], y, "s", label="held-out stdlib code")
    for yi, value in zip(y, prose):
        ax.annotate(f"{value:.3f}", (value, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_yticks(y, [_label(r) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.7)
    ax.set_xlabel("bits per byte (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Quality at equal training bytes")
    ax.legend(fontsize=8, loc="best")
    save_png(fig, path)
    return drawn


def plot_training_curves(results: dict[str, dict], order: list[str], path: Path) -> dict[str, np.ndarray]:
    """The training objective against training bytes seen, smoothed over SMOOTH_STEPS steps: cross entropy
    in bits per training byte with the separator (EOD) targets included, so not the bits per byte of
    docs/EVALUATION.md (which the evaluation figures use). The BPE row's bits per token are divided by its
    training bytes per token."""
    plt = require_matplotlib()
    drawn = {}
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in _ordered(results, order):
        per_unit = train_bytes_per_unit(r)
        curve = smoothed(r["train_curve"]) / per_unit
        bytes_seen = np.arange(1, len(curve) + 1) * r["train_bytes"] / len(curve)
        ax.plot(bytes_seen / 1e6, curve, label=_label(r), linewidth=1.2)
        drawn[r["row"]] = curve
    ax.set_xlabel("training bytes seen (MB)")
    ax.set_ylabel(f"training cross entropy, bits per byte, EOD targets included ({SMOOTH_STEPS}-step average)")
    finals = [c[-1] for c in drawn.values()]
    if finals:
        ax.set_ylim(min(finals) * 0.9, max(finals) * 1.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training curves")
    save_png(fig, path)
    return drawn


def plot_compression(results: dict[str, dict], order: list[str], path: Path) -> dict[str, tuple[float, float]]:
    """Scatter: bytes per concept (per BPE token for row 7) against pydocs-valid bits per byte."""
    plt = require_matplotlib()
    drawn = {}
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in _ordered(results, order):
        valid = r["eval"][PYDOCS_SET]
        point = (valid["bytes_per_concept"], valid["bits_per_byte"])
        ax.scatter(*point)
        ax.annotate(_label(r), point, textcoords="offset points", xytext=(4, 4), fontsize=8)
        drawn[r["row"]] = point
    ax.set_xlabel("pydocs-valid bytes per concept (row 7: per BPE token)")
    ax.set_ylabel("pydocs-valid bits per byte")
    ax.grid(alpha=0.3)
    ax.set_title("Compression against quality")
    save_png(fig, path)
    return drawn


def write_plots(results: dict[str, dict], order: list[str], directory: Path) -> list[Path]:
    """All three plots into directory; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "quality_bits_per_byte.png", directory / "quality_training_curves.png",
             directory / "quality_compression.png"]
    plot_bits_per_byte(results, order, paths[0])
    plot_training_curves(results, order, paths[1])
    plot_compression(results, order, paths[2])
    return paths


AXIS_LABELS = {"train_flops": "training FLOPs (measured)", "train_cpu_s": "training CPU seconds (one core)"}


def plot_scaling(points: dict[str, list[tuple[float, object]]], fits: dict[str, object], axis: str,
                 path: Path) -> dict[str, dict]:
    """The scaling study (benchmarks/scaling.py) on log-log axes: per row, its budgets' points (x = mean over
    seeds, y = mean pydocs-valid bits per byte with a min-max bar: objects with .mean/.low/.high) and its fitted
    line (an object with .slope/.intercept in log10 and the measured .x_low/.x_high), drawn over the range
    of every row's x so that crossings show. Returns what it drew per row: the points and the line's two ends."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [x for row in points.values() for x, _ in row]
    lo, hi = (min(xs), max(xs)) if xs else (1.0, 10.0)
    drawn = {}
    for name, row in points.items():
        row = sorted(row, key=lambda p: p[0])
        x = [p[0] for p in row]
        y = [p[1].mean for p in row]
        err = [[p[1].mean - p[1].low for p in row], [p[1].high - p[1].mean for p in row]]
        bars = ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=name)
        entry = {"points": [(p[0], p[1].mean, p[1].low, p[1].high) for p in row], "line": None}
        fit = fits.get(name)
        if fit is not None:
            ends = np.array([lo / 1.5, hi * 1.5])
            line = 10 ** (fit.intercept + fit.slope * np.log10(ends))
            ax.plot(ends, line, "-", color=bars[0].get_color(), linewidth=1,
                    label=f"{name}: slope {fit.slope:.3f}")
            entry["line"] = [(float(a), float(b)) for a, b in zip(ends, line)]
        drawn[name] = entry
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = plt.FuncFormatter(lambda value, _: f"{value:g}")  # 2.5, not 2.5 x 10^0
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(AXIS_LABELS.get(axis, axis))
    ax.set_ylabel("pydocs-valid bits per byte (mean, min-max over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("Scaling: bits per byte against compute (log-log, least-squares lines)")
    save_png(fig, path)
    return drawn
