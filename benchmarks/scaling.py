"""`python -m benchmarks.scaling`: the scaling study of issue 14 (does SynergyLM overtake a tuned BPE Llama as
compute grows?), run resumably one core at a time, then reported from the result files.

    python -m benchmarks.scaling run --core 0 --out OUT [--row NAME ...] [--budgets 4 12 36] [--seeds 2 2 1]
    python -m benchmarks.scaling report --out OUT        # or: run ... --report-only

Protocol:
- budgets are CPU-minutes of training per row on one core. A row's training bytes at a budget are its own
  measured throughput x the budget, so rows spend about equal CPU time: at the smallest budget a short
  calibration at its start (learned routers held at their target compression; cached in
  OUT/scaling/<row>/calibration.json and recorded in every result), at a
  larger one the throughput its training measured at the smaller budget (`budget_bytes`); every row reads the same
  prefix of the same stream (benchmarks/quality.py's training text), in the same order, whatever its seed:
  the seed changes the initialisation only. Each run records its real CPU seconds and measured FLOPs.
- rows: any row of benchmarks/quality_rows.py, plus the Llama/BPE anchor's natural form (512 tokens per
  window) with an 8k and a 32k vocabulary. Each anchor form gets a learning-rate sweep at the smallest
  budget (seed 0); the lr with the lowest pydocs-valid bits per byte is used for its other seeds and budgets.
- every (row, budget, seed, lr) trains in its own process on the pinned core and writes
  OUT/scaling/<row>/<budget>/<seed>[-lr<lr>]/result.json; a run whose file exists is skipped, so an
  interrupted study resumes, and invocations on different cores with disjoint rows can share OUT.
- the report reads only those files: per row and budget the mean and the range (min-max) over seeds, a
  log-log least-squares line per row of bits per byte against training FLOPs and against CPU seconds,
  and where each SynergyLM row's line crosses the tuned anchor's (the strongest anchor form).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks import quality
from benchmarks.quality_plots import plot_scaling
from benchmarks.quality_rows import (
    BYTE_TRANSFORMER_ROW,
    LLAMA_ROW,
    REFERENCE_ROW,
    ROW_NAMES,
    default_config,
    model_config,
    with_overrides,
)
from benchmarks.recipes import RECIPES
from synergy_dist.bench.results import BenchResults, Figure, write_results
from synergy_dist.model.accounting import flops_per_byte
from synergy_dist.model.config import LEARNED_ROUTER_KINDS
from synergy_dist.report import ReportError

# the anchor's natural form: 512 tokens per window, two vocabularies (the report compares with the strongest form)
NATURAL_ANCHORS = {"llama-bpe-512t-8k": {"bpe_vocab": 8192, "bpe_seq_tokens": 512},
                   "llama-bpe-512t-32k": {"bpe_vocab": 32768, "bpe_seq_tokens": 512}}
ANCHOR_ROWS = [LLAMA_ROW, *NATURAL_ANCHORS]
DEFAULT_ROWS = ["synergy-cosine", "byte-transformer", *ANCHOR_ROWS]
SETS = (quality.PYDOCS_SET, quality.CODE_SET)  # the sets whose bits per byte are fitted and compared
RESULT = "result.json"


def study_rows() -> list[str]:
    """Every row the study can run: the quality rows (whatever quality_rows.py holds today), the natural anchors
    and the SynergyLM recipes (benchmarks/recipes.py)."""
    return [*ROW_NAMES, *NATURAL_ANCHORS, *RECIPES]


@dataclass
class StudyConfig:
    out: str = "bench_out"  # results go to OUT/scaling/...; the report to OUT/scaling.{json,md} and plots
    rows: list[str] = field(default_factory=lambda: list(DEFAULT_ROWS))
    budgets: list[float] = field(default_factory=lambda: [4.0, 12.0, 36.0])  # CPU-minutes of training per row
    seeds: list[int] = field(default_factory=lambda: [2, 2, 1])  # seeds per budget (one value: every budget)
    lr_sweep: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # anchors: multiples of the base lr
    core: int = -1  # the CPU every run is pinned to; -1 = the first CPU this process may use
    calibration_steps: int = 10  # timed steps of a row's throughput calibration ...
    calibration_warmup: int = 30  # ... after this many untimed ones (a learned router's compression settles)
    # corpora, batch, windows, base lr, schedule, eval caps; zh-fortunes (2.1 MB, evaluated for its compression
    # only) is read up to 256 kB, which took two thirds of a run's evaluation time whole
    quality: quality.QualityConfig = field(default_factory=lambda: quality.QualityConfig(
        extra_eval=["zh-fortunes.jsonl.zst"], extra_eval_bytes=262_144))

    def validate(self) -> None:
        unknown = [r for r in self.rows if r not in study_rows()]
        if unknown:
            raise ValueError(f"scaling rows {unknown} are unknown; choose from {study_rows()}")
        if not self.rows:
            raise ValueError("no scaling rows selected; pass --row NAME")
        if not self.budgets or any(not b > 0 for b in self.budgets):
            raise ValueError(f"scaling --budgets {self.budgets} must be positive CPU-minutes")
        if len(self.seeds) not in (1, len(self.budgets)) or any(n < 1 for n in self.seeds):
            raise ValueError(f"scaling --seeds {self.seeds} must be one count >= 1, or one per budget "
                             f"({len(self.budgets)})")
        if not self.lr_sweep or any(not m > 0 for m in self.lr_sweep):
            raise ValueError(f"scaling --lr-sweep {self.lr_sweep} must be positive multiples of the base lr")
        if self.calibration_steps < 1 or self.calibration_warmup < 1:
            raise ValueError(f"scaling calibration_steps={self.calibration_steps} and calibration_warmup="
                             f"{self.calibration_warmup} must be >= 1")
        for name in self.rows:
            if name in RECIPES:  # a recipe's overrides are checked here, not in its run's worker
                with_overrides(default_config(), recipe_overrides(name))
        q = quality.QualityConfig(**{**asdict(self.quality), "rows": [quality_row(r) for r in self.rows],
                                     "train_bytes": 1})
        q.validate()  # corpora, libraries of the anchors, window sizes: the quality harness's own checks
        self.quality.corpora = q.corpora

    def seeds_at(self, budget: float) -> int:
        return self.seeds[0] if len(self.seeds) == 1 else self.seeds[self.budgets.index(budget)]


def is_synergy(name: str) -> bool:
    """A SynergyLM row: any quality row but the byte Transformer and the BPE anchors, and every recipe."""
    return name in RECIPES or (name in ROW_NAMES and name not in (BYTE_TRANSFORMER_ROW.name, LLAMA_ROW))


def recipe_overrides(name: str) -> list[str]:
    """The `model.*` overrides that make row 1 into recipe `name` (none for any other row)."""
    return list(RECIPES[name].overrides) if name in RECIPES else []


def recipe_lr_mult(name: str) -> float:
    """The multiple of the base lr that recipe `name` trains at (1 for any other row)."""
    return RECIPES[name].lr_mult if name in RECIPES else 1.0


def quality_row(name: str) -> str:
    """The quality row that trains a study row (the natural anchors are row 7 with other settings, the recipes
    row 1 with overrides)."""
    if name in RECIPES:
        return REFERENCE_ROW
    return LLAMA_ROW if name in NATURAL_ANCHORS else name


CALIBRATION_ROUTER_HOLD = 10**9  # the routers' warm-up length while calibrating: the stride's share stays ~1


def calibration_overrides(name: str, seq_len: int) -> list[str]:
    """The `model.*` overrides a row's calibration runs with: the row's own (a recipe's), and every learned router
    held at its target compression by its warm-up (a boundary every round(N) inputs, the learned router still
    computed, so the step costs what the design's does at N). A learned router's first steps swing between one
    and hundreds of bytes per concept, and the step's cost with them: timed with its router free, the attention
    byte level (`recipe-attention-encdec`) made one concept per window, ran 1.5x the speed its training then
    had, and overran its budget by 47%."""
    overrides = recipe_overrides(name)
    if not is_synergy(name):  # the byte Transformer and the BPE anchors have no router
        return overrides
    for i, stage in enumerate(with_overrides(model_config(quality_row(name), seq_len), overrides).stages):
        if stage.router.kind in LEARNED_ROUTER_KINDS:  # replaces a recipe's own warm-up
            key = f"model.stages.{i}.router.warmup_steps="
            overrides = [o for o in overrides if not o.startswith(key)] + [f"{key}{CALIBRATION_ROUTER_HOLD}"]
    return overrides


def calibration_row(name: str, seq_len: int) -> str:
    """The row whose calibration sizes `name`'s runs: a recipe that leaves row 1's design FLOPs per byte as they
    are (an lr, a loss weight, a warm-up) has row 1's cost and trains row 1's bytes, so that a recipe and row 1
    compare on the same data and, seed by seed, from the same initial weights; any other row calibrates itself."""
    if name in RECIPES:
        recipe_cfg = with_overrides(default_config(), recipe_overrides(name))
        if flops_per_byte(recipe_cfg, seq_len) == flops_per_byte(default_config(), seq_len):
            return REFERENCE_ROW
    return name


def run_dir(out: Path, row: str, budget: float, seed: int, lr: float | None) -> Path:
    """OUT/scaling/<row>/<budget>/<seed>[-lr<lr>]: lr only for the anchors, which sweep it."""
    return out / "scaling" / row / f"{budget:g}" / (f"{seed}" if lr is None else f"{seed}-lr{lr:g}")


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a killed run never leaves a result file that would be skipped next time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------- one run (worker process)


def worker_main() -> None:
    """Entry of a run's subprocess: argv[1] is the job run_one builds. Calibrates the row once (cached),
    sizes the training bytes to the budget, trains and evaluates; prints the result as JSON."""
    job = json.loads(sys.argv[1])
    cfg = quality.QualityConfig(**job["cfg"])
    calibration_path = Path(job["calibration"])
    if calibration_path.is_file():
        calibration = json.loads(calibration_path.read_text())
    else:  # before any training of this row, on the stream's first steps, at the base lr and seed
        # the calibrated row's own model (a recipe that borrows row 1's calibration: row 1's) with its learned
        # routers held at their targets (`calibration_overrides`), at the base lr
        calibrated = replace(cfg, model_overrides=job.get("calibration_overrides", []))
        bytes_per_s = quality.calibrate(calibrated, job["calibration_steps"], quality_row(job["row"]),
                                        job["calibration_warmup"])
        calibration = {"bytes_per_s_cpu": bytes_per_s, "timed_steps": job["calibration_steps"],
                       "warmup_steps": job["calibration_warmup"], "model_overrides": calibrated.model_overrides,
                       "batch_size": cfg.batch_size, "seq_len": cfg.seq_len}
        _write_json(calibration_path, calibration)
    sizing = budget_bytes(calibration_path.parent, job["budget_minutes"], calibration["bytes_per_s_cpu"],
                          cfg.batch_size, cfg.seq_len)
    cfg.train_bytes = sizing["train_bytes"]
    cfg.lr, cfg.init_seed = job["lr"], job["seed"]
    result = quality.run_row(quality_row(job["row"]), cfg)
    result.update(study_row=job["row"], budget_minutes=job["budget_minutes"], seed=job["seed"], lr=job["lr"],
                  lr_role=job["lr_role"], lr_sweep=job["lr_sweep"], calibration=calibration, sizing=sizing,
                  core=sorted(os.sched_getaffinity(0)))
    print(json.dumps(result))


def budget_bytes(row_dir: Path, budget: float, calibrated: float, batch_size: int, seq_len: int) -> dict:
    """{"train_bytes", "source"}: the bytes a row's runs at `budget` are told to train, and why, from the row's
    own result files (row_dir = OUT/scaling/<row>). Every seed and lr of a budget trains the bytes of the budget's
    first run; that run is sized by the mean training throughput the row measured at its largest smaller budget
    (the calibration's 40 steps had row 1 11% slow and the quality table's anchor 10% fast at 12 minutes), and
    the smallest budget by the calibration."""
    runs: dict[float, list[dict]] = {}
    for path in row_dir.glob(f"*/*/{RESULT}"):
        run = json.loads(path.read_text())
        runs.setdefault(float(run["budget_minutes"]), []).append(run)
    from_calibration = {"train_bytes": quality.train_bytes_for_budget(calibrated, budget, batch_size, seq_len),
                        "source": "the calibration"}
    if budget in runs:  # the sizing its first run recorded (a BPE row's train_bytes are what its windows covered)
        return runs[budget][0].get("sizing", from_calibration)
    smaller = [b for b in runs if b < budget]
    if not smaller:
        return from_calibration
    measured = max(smaller)
    rate = sum(r["train_bytes_per_s_cpu"] for r in runs[measured]) / len(runs[measured])
    return {"train_bytes": quality.train_bytes_for_budget(rate, budget, batch_size, seq_len),
            "source": f"{rate:.0f} B/s, the training throughput measured at {measured:g} min"}


def run_one(cfg: StudyConfig, row: str, budget: float, seed: int, lr: float, lr_role: str,
            sweep: dict[float, float] | None = None) -> tuple[Path, str]:
    """Train one (row, budget, seed, lr) unless its result exists; returns (result path, what happened).
    `sweep` ({lr: bits per byte} that chose lr) is recorded in the result."""
    out = Path(cfg.out)
    path = run_dir(out, row, budget, seed, lr if row in ANCHOR_ROWS else None) / RESULT
    if path.is_file():
        return path, "skipped (result exists)"
    q = replace(cfg.quality, rows=[quality_row(row)], work_dir=str(out / "scaling" / "tokenizers"),
                model_overrides=recipe_overrides(row),
                **NATURAL_ANCHORS.get(row, {}))
    calibrated = calibration_row(row, q.seq_len)
    job = {"row": row, "budget_minutes": budget, "seed": seed, "lr": lr, "lr_role": lr_role,
           "lr_sweep": {f"{k:g}": v for k, v in (sweep or {}).items()}, "cfg": asdict(q),
           "calibration": str(out / "scaling" / calibrated / "calibration.json"),
           "calibration_overrides": calibration_overrides(calibrated, q.seq_len),
           "calibration_steps": cfg.calibration_steps, "calibration_warmup": cfg.calibration_warmup}
    result, error = quality.run_worker(job, timeout_s=max(3600.0, 4 * 60 * budget), entry="benchmarks.scaling")
    if result is None:
        return path, f"failed: {error}"
    _write_json(path, result)
    return path, "trained"


def best_lr(sweep: dict[float, float]) -> float:
    """The learning rate of the lowest pydocs-valid bits per byte (ties: the smaller lr)."""
    return min(sweep, key=lambda lr: (sweep[lr], lr))


def read_sweep(out: Path, row: str, budget: float, lrs: list[float]) -> dict[float, float]:
    """{lr: pydocs-valid bits per byte} of the anchor's seed-0 runs at `budget` that exist."""
    sweep = {}
    for lr in lrs:
        path = run_dir(out, row, budget, 0, lr) / RESULT
        if path.is_file():
            sweep[lr] = json.loads(path.read_text())["eval"][quality.PYDOCS_SET]["bits_per_byte"]
    return sweep


def sweep_budget(out: Path, row: str, budgets: list[float]) -> float:
    """The budget of anchor `row`'s lr sweep: the smallest it has sweep runs at in OUT, or else the smallest asked
    for. Adding seeds at a larger budget later (`--budgets 36`) reuses the sweep instead of sweeping there."""
    runs = [json.loads(p.read_text()) for p in (out / "scaling" / row).glob(f"*/0-lr*/{RESULT}")]
    return min([r["budget_minutes"] for r in runs if r["lr_role"] == "sweep"] + [min(budgets)])


def run_study(cfg: StudyConfig, log=print) -> list[tuple[Path, str]]:
    """Every run of cfg.rows, smallest budget first (an anchor's lr sweep comes first), pinned to cfg.core."""
    cfg.validate()
    core = cfg.core if cfg.core >= 0 else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # the runs' processes inherit it
    os.environ["OMP_NUM_THREADS"] = "1"
    out, base_lr = Path(cfg.out), cfg.quality.lr
    done = []

    def one(row, budget, seed, lr, role, sweep=None):
        path, status = run_one(cfg, row, budget, seed, lr, role, sweep)
        log(f"scaling: {row} budget {budget:g} min seed {seed} lr {lr:g}: {status} ({path})")
        done.append((path, status))

    # budget by budget, so that an unfinished study has every row at its smaller budgets
    waiting = set()  # anchors whose lr sweep is incomplete: their larger budgets wait for it
    swept_at = {row: sweep_budget(out, row, cfg.budgets) for row in cfg.rows if row in ANCHOR_ROWS}
    for budget in sorted(cfg.budgets):
        for row in cfg.rows:
            seeds = range(cfg.seeds_at(budget))
            if row not in ANCHOR_ROWS:
                for seed in seeds:
                    one(row, budget, seed, base_lr * recipe_lr_mult(row), "default")
                continue
            lrs = [base_lr * m for m in cfg.lr_sweep]
            swept = swept_at[row]
            if budget == swept:
                for lr in lrs:
                    one(row, budget, 0, lr, "sweep")
            sweep = read_sweep(out, row, swept, lrs)
            if len(sweep) < len(lrs):
                if row not in waiting:
                    log(f"scaling: {row}: the lr sweep at {swept:g} min is incomplete ({sorted(sweep)} of {lrs}); "
                        f"its other runs wait for it (run again with {swept:g} among --budgets)")
                waiting.add(row)
                continue
            lr = best_lr(sweep)
            for seed in seeds:
                if not (budget == swept and seed == 0):  # that run is the sweep's
                    one(row, budget, seed, lr, "selected", sweep)
    return done


# ---------------------------------------------------------------------------------- the report (from files only)


@dataclass
class Spread:
    """Mean and range over seeds of one quantity."""

    mean: float
    low: float
    high: float
    n: int
    values: list[float]

    @property
    def range(self) -> float:
        return self.high - self.low


def spread(values: list[float]) -> Spread:
    return Spread(sum(values) / len(values), min(values), max(values), len(values), list(values))


@dataclass
class Fit:
    """log10(y) = intercept + slope * log10(x), least squares over the runs' points."""

    slope: float
    intercept: float
    x_low: float  # the measured range of x
    x_high: float
    n: int

    def at(self, x: float) -> float:
        return 10 ** (self.intercept + self.slope * math.log10(x))


def fit_loglog(xs: list[float], ys: list[float]) -> Fit | None:
    """Least squares on (log10 x, log10 y); None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    lx, ly = [math.log10(x) for x in xs], [math.log10(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return Fit(slope, my - slope * mx, min(xs), max(xs), len(xs))


@dataclass
class Crossover:
    x: float | None  # where the lines cross; None: parallel
    inside: bool  # within the measured range of both rows together (min of either to max of either)
    better_above: str  # the row whose line is lower beyond the crossing ("" when parallel)


def crossover(a: Fit, b: Fit, name_a: str, name_b: str) -> Crossover:
    """Where line a meets line b; the row with the steeper (more negative) slope is lower beyond it."""
    if math.isclose(a.slope, b.slope, rel_tol=0, abs_tol=1e-12):
        return Crossover(None, False, "")
    log_x = (b.intercept - a.intercept) / (a.slope - b.slope)
    if abs(log_x) > 300:  # nearly parallel: they meet beyond any compute a float can hold (10^308)
        return Crossover(None, False, "")
    x = 10 ** log_x
    inside = min(a.x_low, b.x_low) <= x <= max(a.x_high, b.x_high)
    return Crossover(x, inside, name_a if a.slope < b.slope else name_b)


def load_runs(out: Path) -> list[dict]:
    """Every result file under OUT/scaling (the study's only input to the report)."""
    runs = [json.loads(p.read_text()) for p in sorted((Path(out) / "scaling").glob(f"*/*/*/{RESULT}"))]
    if not runs:
        raise FileNotFoundError(f"no scaling results (OUT/scaling/<row>/<budget>/<seed>/{RESULT}) under {out}; "
                                "run `python -m benchmarks.scaling run --out OUT` first")
    return runs


def chosen_runs(runs: list[dict]) -> tuple[dict[tuple[str, float], list[dict]], dict[str, dict]]:
    """{(row, budget): the runs that count} and {anchor: {"lr": chosen, "sweep": {lr: bpb}, "budget": b,
    "others": {budget: {lr: bpb}}}}. The sweep is the one at the anchor's smallest swept budget; an anchor's runs
    count only at the lr it chose. Other lrs (the sweep's, and any lr tried at a larger budget) are reported apart."""
    sweeps: dict[str, dict] = {}
    for r in runs:
        if r["lr_role"] == "sweep":
            by_budget = sweeps.setdefault(r["study_row"], {})
            by_budget.setdefault(r["budget_minutes"], {})[r["lr"]] = r["eval"][quality.PYDOCS_SET]["bits_per_byte"]
    for row, by_budget in sweeps.items():
        budget = min(by_budget)
        sweeps[row] = {"budget": budget, "sweep": by_budget[budget], "lr": best_lr(by_budget[budget]),
                       "others": {b: lrs for b, lrs in sorted(by_budget.items()) if b != budget}}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        if r["study_row"] in sweeps and r["lr"] != sweeps[r["study_row"]]["lr"]:
            continue
        groups.setdefault((r["study_row"], r["budget_minutes"]), []).append(r)
    for key in groups:
        groups[key].sort(key=lambda r: r["seed"])
    return dict(sorted(groups.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1]))), sweeps


def _order(row: str) -> int:
    names = study_rows()
    return names.index(row) if row in names else len(names)


def tuned_anchor(groups: dict[tuple[str, float], list[dict]]) -> str | None:
    """The strongest anchor form, each at its swept lr: the lowest mean pydocs-valid bits per byte at the largest
    budget that two or more forms reached (one form: that one). A form left behind at a smaller budget (the
    natural form that lost to the other vocabulary) does not hold the choice back to that budget. SynergyLM is
    compared with the best BPE Llama measured, whichever window and vocabulary it has."""
    budgets = {name: {b for (row, b) in groups if row == name} for name in ANCHOR_ROWS}
    present = [name for name, b in budgets.items() if b]
    if len(present) < 2:
        return present[0] if present else None
    shared = [b for b in set().union(*budgets.values()) if sum(b in budgets[name] for name in present) >= 2]
    if not shared:
        return None
    budget = max(shared)
    there = [name for name in present if budget in budgets[name]]
    return min(there, key=lambda name: spread([bpb(r, quality.PYDOCS_SET) for r in groups[(name, budget)]]).mean)


def compression_texts(groups: dict[tuple[str, float], list[dict]], eval_sets: list[str]) -> dict[str, tuple]:
    """{column label: (eval set, bytes evaluated)}: bytes per concept or token compare only on the same text, so a
    set evaluated at two sizes (the study's cap on an evaluation-only set, added after some runs read it whole)
    gets a column per size; a set always read at one size keeps its name."""
    sizes = {name: sorted({r["eval"][name].get("bytes") or 0 for runs in groups.values() for r in runs
                           if name in r["eval"]}) for name in eval_sets}
    return {(name if len(sizes[name]) == 1 else f"{name} ({size:,} B)"): (name, size or None)
            for name in eval_sets for size in sizes[name]}


def bpb(run: dict, name: str) -> float | None:
    return run["eval"].get(name, {}).get("bits_per_byte")


def fits(groups, axis: str, eval_set: str) -> dict[str, Fit]:
    """Per row, the log-log fit of bits per byte on eval_set against axis ("train_flops" or "train_cpu_s"); only
    rows measured at two budgets or more (the seeds of one budget differ in x by noise, not by design)."""
    budgets: dict[str, set] = {}
    for row, budget in groups:
        budgets.setdefault(row, set()).add(budget)
    points: dict[str, tuple[list, list]] = {}
    for (row, _), runs in groups.items():
        if len(budgets[row]) < 2:
            continue
        for r in runs:
            if bpb(r, eval_set) is not None:
                points.setdefault(row, ([], []))[0].append(r[axis])
                points[row][1].append(bpb(r, eval_set))
    return {row: f for row, (xs, ys) in points.items() if (f := fit_loglog(xs, ys)) is not None}


def real_difference(a: Spread, b: Spread) -> str:
    """'real' when the means differ by more than the wider of the two ranges; 'within spread' otherwise;
    'unknown (one seed)' when a side has a single seed (no spread measured)."""
    if a.n < 2 or b.n < 2:
        return "unknown (one seed)"
    return "real" if abs(a.mean - b.mean) > max(a.range, b.range) else "within spread"


def _fmt_spread(s: Spread | None, digits: int = 3) -> str:
    if s is None:
        return "n/a"
    return f"{s.mean:.{digits}f} [{s.low:.{digits}f}-{s.high:.{digits}f}] n={s.n}"


def build_report(out: Path, command: str) -> tuple[BenchResults, dict]:
    """The study's report from OUT/scaling's result files: figures, notes, markdown tables, plots; and the
    numbers behind them (what the JSON keeps and tests compare with the files)."""
    out = Path(out)
    groups, sweeps = chosen_runs(load_runs(out))
    report = BenchResults(name="scaling", command=command)
    report.notes.append("spread = min-max range over seeds; a difference is 'real' only when the means differ by "
                        "more than the wider range of the two (one seed: unknown)")
    anchor = tuned_anchor(groups)
    summary: dict = {"cells": {}, "fits": {}, "crossovers": {}, "equal_x": {}, "sweeps": sweeps,
                     "tuned_anchor": anchor}
    eval_sets = sorted({name for runs in groups.values() for r in runs for name in r["eval"]},
                       key=lambda n: (n not in SETS, n))
    lines = ["| row | budget (CPU-min) | pydocs-valid bit/B | held-out code bit/B | train FLOPs | train CPU s "
             "| train bytes | lr |", "|---|---|---|---|---|---|---|---|"]
    texts = compression_texts(groups, eval_sets)
    compression = ["| row | budget | " + " | ".join(f"{label} bytes per concept / token" for label in texts) + " |",
                   "|---|---|" + "---|" * len(texts)]
    for (row, budget), runs in groups.items():
        per_set = {name: [r for r in runs if name in r["eval"]] for name in eval_sets}  # runs that evaluated it
        cell = {name: spread([bpb(r, name) for r in rs]) for name, rs in per_set.items() if rs}
        cell["train_flops"] = spread([r["train_flops"] for r in runs])
        cell["train_cpu_s"] = spread([r["train_cpu_s"] for r in runs])
        cell["bytes_per_concept"] = {}
        for label, (name, size) in texts.items():
            values = [r["eval"][name]["bytes_per_concept"] for r in per_set[name]
                      if r["eval"][name].get("bytes") == size]
            if values:
                cell["bytes_per_concept"][label] = spread(values)
        summary["cells"][f"{row}/{budget:g}"] = cell
        for name in SETS:
            if name in cell:
                report.add(Figure(f"{row}/{budget:g}min/bpb_{name}", cell[name].mean, "bit/B", cell[name].values,
                                  f"mean of {cell[name].n} seeds, range {cell[name].low:.4f}-{cell[name].high:.4f}"))
        lines.append(f"| {row} | {budget:g} | {_fmt_spread(cell.get(quality.PYDOCS_SET))} "
                     f"| {_fmt_spread(cell.get(quality.CODE_SET))} | {cell['train_flops'].mean:.3g} "
                     f"| {cell['train_cpu_s'].mean:,.0f} | {runs[0]['train_bytes']:,} | {runs[0]['lr']:g} |")
        compression.append(f"| {row} | {budget:g} | " + " | ".join(
            _fmt_spread(cell["bytes_per_concept"].get(label), 2) for label in texts) + " |")
    tables = ["### Bits per byte (mean [min-max] n=seeds)", "", *lines, "",
              "### Bytes per concept (SynergyLM) / per BPE token (anchors) / 1 (byte Transformer)", "", *compression]
    fit_lines = ["| row | eval set | axis | slope | intercept (log10) | points | measured range |",
                 "|---|---|---|---|---|---|---|"]
    equal_lines = ["| SynergyLM row | budget | eval set | axis | x (mean) | SynergyLM bit/B | tuned anchor's line "
                   "there | difference | anchor's line |", "|---|---|---|---|---|---|---|---|---|"]
    cross_lines = ["| SynergyLM row | eval set | axis | crossover with the tuned anchor | where | lower beyond it |",
                   "|---|---|---|---|---|---|"]
    for axis in ("train_flops", "train_cpu_s"):
        for name in SETS:
            row_fits = fits(groups, axis, name)
            for row, f in row_fits.items():
                summary["fits"][f"{row}/{name}/{axis}"] = asdict(f)
                fit_lines.append(f"| {row} | {name} | {axis} | {f.slope:.4f} | {f.intercept:.4f} | {f.n} "
                                 f"| {f.x_low:.3g}-{f.x_high:.3g} |")
            if anchor not in row_fits:
                continue
            for row, budget in groups:  # each SynergyLM point against the anchor's line there
                cell = summary["cells"][f"{row}/{budget:g}"]
                if is_synergy(row) and name in cell:
                    x, y, line = cell[axis].mean, cell[name].mean, row_fits[anchor]
                    e = {"x": x, "synergy": y, "anchor_line": line.at(x), "inside": line.x_low <= x <= line.x_high}
                    summary["equal_x"][f"{row}/{budget:g}/{name}/{axis}"] = e
                    equal_lines.append(f"| {row} | {budget:g} | {name} | {axis} | {x:.3g} | {y:.3f} "
                                       f"| {e['anchor_line']:.3f} | {y - e['anchor_line']:+.3f} "
                                       f"| {'interpolated' if e['inside'] else 'extrapolated'} |")
            for row, f in row_fits.items():
                if not is_synergy(row):
                    continue
                c = crossover(f, row_fits[anchor], row, anchor)
                summary["crossovers"][f"{row}/{name}/{axis}"] = asdict(c)
                where = "none (parallel)" if c.x is None else ("inside" if c.inside else "outside") + \
                    " the measured range"
                cross_lines.append(f"| {row} | {name} | {axis} | {'n/a' if c.x is None else f'{c.x:.3g}'} "
                                   f"| {where} | {c.better_above or 'n/a'} |")
    sweep_lines = ["| anchor | budget | lr -> pydocs-valid bit/B (seed 0) | chosen |", "|---|---|---|---|"]
    for row, s in sweeps.items():
        edge = " (the sweep's edge: widen --lr-sweep)" if len(s["sweep"]) > 1 and s["lr"] in (
            min(s["sweep"]), max(s["sweep"])) else ""
        sweep_lines.append(f"| {row} | {s['budget']:g} | "
                           + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(s["sweep"].items()))
                           + f" | {s['lr']:g}{edge} |")
        for budget, lrs in s["others"].items():  # not part of the protocol: shown, never chosen from
            sweep_lines.append(f"| {row} | {budget:g} (seed 0, outside the sweep) | "
                               + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(lrs.items()))
                               + f" | {s['lr']:g} (the sweep's) |")
    versus = ["| SynergyLM row | budget | pydocs-valid bit/B minus tuned anchor's | difference |", "|---|---|---|---|"]
    for (row, budget), _ in groups.items():
        if is_synergy(row) and (anchor, budget) in groups:
            a = summary["cells"][f"{row}/{budget:g}"][quality.PYDOCS_SET]
            b = summary["cells"][f"{anchor}/{budget:g}"][quality.PYDOCS_SET]
            versus.append(f"| {row} | {budget:g} | {a.mean - b.mean:+.3f} | {real_difference(a, b)} |")
    report.notes.append(f"tuned anchor: {anchor or 'none (no natural anchor form measured)'}; the crossover is "
                        "where a SynergyLM row's log-log line meets it ('inside' = within the lowest to the highest "
                        "x either row measured)")
    if equal_lines[2:]:
        equal_lines.insert(0, "The anchor's fitted line evaluated at each SynergyLM point's mean training FLOPs and "
                              "CPU seconds: the comparison at equal compute, which equal budgets only approach.\n")
    tables += ["", "### Learning-rate sweeps of the anchors", "", *sweep_lines, "",
               f"### SynergyLM against the tuned anchor ({anchor})", "", *versus, "",
               "### Log-log fits: log10(bit/B) = intercept + slope x log10(x)", "", *fit_lines, "",
               "### SynergyLM against the tuned anchor's line at equal compute", "", *equal_lines, "",
               "### Crossovers with the tuned anchor", "", *cross_lines]
    try:
        for axis, stem in (("train_flops", "scaling_flops.png"), ("train_cpu_s", "scaling_cpu_seconds.png")):
            points: dict[str, list] = {}
            for (row, budget) in groups:
                cell = summary["cells"][f"{row}/{budget:g}"]
                points.setdefault(row, []).append((cell[axis].mean, cell[quality.PYDOCS_SET]))
            drawn = plot_scaling(points, fits(groups, axis, quality.PYDOCS_SET), axis, out / "scaling" / stem)
            summary.setdefault("plots", {})[stem] = drawn
            report.notes.append(f"plot: {out / 'scaling' / stem}")
    except ReportError as err:  # matplotlib is an optional extra
        report.notes.append(f"no plots: {err}")
    report.appendix = "\n".join(tables)
    return report, summary


def _jsonable(value):
    if isinstance(value, Spread):
        return asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_report(out: Path, command: str) -> tuple[Path, Path]:
    """OUT/scaling.json (the benchmark record plus the study's numbers) and OUT/scaling.md."""
    report, summary = build_report(out, command)
    json_path, md_path = write_results(Path(out), [report], stem="scaling")
    data = json.loads(json_path.read_text())
    data["study"] = _jsonable(summary)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    return json_path, md_path


# ---------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the missing runs of the selected rows on one core, then report")
    report = sub.add_parser("report", help="train nothing: the report from OUT/scaling's result files")
    for p in (run, report):
        p.add_argument("--out", default="bench_out", metavar="DIR", help="study directory (default bench_out)")
    run.add_argument("--row", action="append", default=None, choices=study_rows(),
                     help=f"row(s) to run (default: {DEFAULT_ROWS})")
    run.add_argument("--budgets", type=float, nargs="+", default=None, help="CPU-minutes per row (default 4 12 36)")
    run.add_argument("--seeds", type=int, nargs="+", default=None,
                     help="seeds per budget, one count or one per budget (default 2 2 1)")
    run.add_argument("--lr-sweep", type=float, nargs="+", default=None,
                     help="anchors: multiples of the base lr tried at the smallest budget (default 0.5 1 2)")
    run.add_argument("--core", type=int, default=-1, help="CPU to pin every run to (default: the first allowed)")
    run.add_argument("--corpora", default=None, metavar="DIR",
                     help="directory of the shared corpora (default: $SYNERGY_CORPORA or ../shared/corpora)")
    run.add_argument("--eval-bytes", type=int, default=None, help="cap per evaluation set (default: all)")
    run.add_argument("--extra-eval", nargs="*", default=None, metavar="FILE",
                     help="corpora files evaluated only (default zh-fortunes.jsonl.zst)")
    run.add_argument("--extra-eval-bytes", type=int, default=None,
                     help="cap per evaluation-only set, whole documents (default 262144; 0: the whole set)")
    run.add_argument("--quick", action="store_true",
                     help="smoke-run the harness: 128-byte windows, batch 4, 20 kB evaluation; numbers mean little")
    run.add_argument("--report-only", action="store_true", help="train nothing (same as the report sub-command)")
    return parser


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    cfg = StudyConfig(out=args.out)
    if args.quick:
        cfg.quality.seq_len, cfg.quality.batch_size, cfg.quality.eval_bytes = 128, 4, 20_000
        cfg.calibration_steps, cfg.calibration_warmup = 2, 1
    for key, arg in (("rows", "row"), ("budgets", "budgets"), ("seeds", "seeds"), ("lr_sweep", "lr_sweep"),
                     ("core", "core")):
        if getattr(args, arg) is not None:
            setattr(cfg, key, getattr(args, arg))
    for key, arg in (("corpora", "corpora"), ("eval_bytes", "eval_bytes"), ("extra_eval", "extra_eval"),
                     ("extra_eval_bytes", "extra_eval_bytes")):
        if getattr(args, arg) is not None:
            setattr(cfg.quality, key, getattr(args, arg))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.scaling", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.command == "run" and not args.report_only:
            cfg = config_from_args(args)
            cpus = os.sched_getaffinity(0)
            try:
                done = run_study(cfg, log=lambda line: print(line, file=sys.stderr))
            finally:
                os.sched_setaffinity(0, cpus)
            failed = [status for _, status in done if status.startswith("failed")]
            if failed:
                print(f"scaling: {len(failed)} run(s) failed (their results are not written; run again to retry)",
                      file=sys.stderr)
        json_path, md_path = write_report(Path(args.out), command)
    except (ValueError, FileNotFoundError) as e:
        print(f"scaling: error: {e}", file=sys.stderr)
        return 2
    print(md_path.read_text())
    print(f"scaling: wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
