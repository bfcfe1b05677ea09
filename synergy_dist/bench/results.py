"""What every benchmark records: the machine, the date, figures, targets; written as JSON + markdown.

A benchmark fills a `BenchResults` with `Figure`s (a median over repeats, with the raw repeats kept)
and `Target`s (a figure or a ratio of two figures checked against a threshold). Ratios are always
between figures measured in the same run, because the machine is shared and absolute speeds drift.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Figure:
    """One measured quantity: the median of `samples`, or None with the reason it is missing."""

    name: str = ""  # short identifier, e.g. "synergy_stream_bytes_per_s"
    value: float | None = None  # median of samples; None when not measured
    unit: str = ""  # e.g. "B/s", "s", "MB", "%"
    samples: list[float] = field(default_factory=list)  # every repeat, in order
    detail: str = ""  # how it was measured, or why it is not available


@dataclass
class Target:
    """A goal: `measured <op> threshold`, where measured is a figure's value or a ratio of two."""

    name: str = ""  # what the goal says, e.g. "stream vs raw zstd decompression"
    measured: float | None = None  # the figure or ratio the goal is judged on
    op: str = ">="  # ">=" or "<"
    threshold: float = 0.0  # the goal's bound
    unit: str = "x"  # "x" for ratios, else the figure's unit

    @property
    def status(self) -> str:
        if self.measured is None:
            return "not available"
        if self.op == ">=":
            return "met" if self.measured >= self.threshold else "missed"
        if self.op == "<":
            return "met" if self.measured < self.threshold else "missed"
        raise ValueError(f"Target {self.name!r}: op must be '>=' or '<', got {self.op!r}")


@dataclass
class BenchResults:
    """Everything one benchmark (data, model, ...) measured in one run."""

    name: str = ""  # benchmark name: "data" or "model"
    command: str = ""  # the command line that produced it
    figures: dict[str, Figure] = field(default_factory=dict)  # by Figure.name
    targets: list[Target] = field(default_factory=list)  # goals judged in this run
    notes: list[str] = field(default_factory=list)  # settings and caveats worth reading with the numbers
    appendix: str = ""  # markdown printed after the notes (e.g. the quality comparison's table)

    def add(self, figure: Figure) -> Figure:
        self.figures[figure.name] = figure
        return figure

    def value(self, name: str) -> float | None:
        figure = self.figures.get(name)
        return None if figure is None else figure.value


def median(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either side is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def figure_from(name: str, samples: list[float], unit: str, detail: str = "") -> Figure:
    return Figure(name=name, value=median(samples), unit=unit, samples=list(samples), detail=detail)


def missing(name: str, unit: str, reason: str) -> Figure:
    return Figure(name=name, value=None, unit=unit, samples=[], detail=f"not available: {reason}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """The facts a reader needs to compare numbers across machines; load shows how shared it was."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "load_average_1_5_15": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "B/s":
        for scale, name in ((1e6, "MB/s"), (1e3, "kB/s")):
            if abs(value) >= scale:
                return f"{value / scale:,.1f} {name}"
        return f"{value:.0f} B/s"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip() if unit not in ("x",) else f"{text}x"


def render_markdown(machine: dict, benches: list[BenchResults]) -> str:
    """A readable summary: machine, then per benchmark a targets table and a figures table."""
    lines = [
        "# synergy-bench results",
        "",
        f"- date: {machine['date_utc']}",
        f"- machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_gib']} GiB RAM",
        f"- load average (1/5/15 min): {machine.get('load_average_at_start')} at the start, "
        f"{machine['load_average_1_5_15']} at the end",
        f"- python {machine['python']}, torch {machine['torch']}",
        "",
    ]
    for bench in benches:
        lines += [f"## {bench.name}", "", f"Command: `{bench.command}`", ""]
        if bench.targets:
            lines += ["| goal | measured | target | status |", "|---|---|---|---|"]
            for target in bench.targets:
                lines.append(
                    f"| {target.name} | {_fmt(target.measured, target.unit)} | "
                    f"{target.op} {_fmt(target.threshold, target.unit)} | {target.status} |"
                )
            lines.append("")
        lines += ["| figure | median | repeats | how |", "|---|---|---|---|"]
        for figure in bench.figures.values():
            repeats = ", ".join(_fmt(s, figure.unit) for s in figure.samples)
            lines.append(f"| {figure.name} | {_fmt(figure.value, figure.unit)} | {repeats} | {figure.detail} |")
        lines.append("")
        for note in bench.notes:
            lines.append(f"- {note}")
        if bench.notes:
            lines.append("")
        if bench.appendix:
            lines += [bench.appendix, ""]
    return "\n".join(lines)


def to_json(machine: dict, benches: list[BenchResults]) -> dict:
    out = {"machine": machine, "benchmarks": {}}
    for bench in benches:
        entry = asdict(bench)
        entry["targets"] = [dict(asdict(t), status=t.status) for t in bench.targets]
        out["benchmarks"][bench.name] = entry
    return out


def write_results(out_dir: Path, benches: list[BenchResults], stem: str = "results",
                 load_at_start: list[float] | None = None) -> tuple[Path, Path]:
    """Write OUT/<stem>.json and OUT/<stem>.md; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    machine["load_average_at_start"] = load_at_start
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(to_json(machine, benches), indent=2) + "\n")
    md_path.write_text(render_markdown(machine, benches) + "\n")
    return json_path, md_path
