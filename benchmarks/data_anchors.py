"""`python -m benchmarks.data_anchors`: `synergy-bench data` plus MosaicML `streaming` and Hugging Face `datasets`.

Runs the data benchmark (synergy_dist.bench.data: raw zstd, our stream, time to first batch) and then,
on the same pinned core, the anchors as subprocesses, each packing the same documents into the same windows:
- MosaicML `streaming` in its own venv (anchors/setup_mosaic_venv.sh), MDS shards, cold and warm epochs;
- Hugging Face `datasets` streaming of the same jsonl.zst.
Takes the data benchmark's flags plus --mosaic-python and --no-hf; writes OUT/data.json and OUT/data.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from synergy_dist.bench import data as data_bench
from synergy_dist.bench.results import (
    BenchResults,
    Target,
    figure_from,
    missing,
    ratio,
    write_results,
)
from synergy_dist.bench.timing import restored_affinity

ANCHOR_DIR = Path(__file__).parent / "anchors"
MOSAIC_PYTHON_ENV = "SYNERGY_BENCH_MOSAIC_PYTHON"  # env var naming the MosaicML venv's python
DEFAULT_MOSAIC_PYTHON = "/work/bench-venvs/mosaic/bin/python"


def run_script(python: str, script: Path, args: list[str], timeout: float = 1800) -> tuple[dict | None, str]:
    """Run an anchor script; returns (its JSON result, "") or (None, the reason it failed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run([python, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{script.name} could not run: {e}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return None, f"{script.name} exited with {proc.returncode}: {tail[0]}"
    try:
        return data_bench.last_json_line(proc.stdout), ""
    except ValueError as e:
        return None, f"{script.name}: {e}"


def add_anchors(report: BenchResults, cfg: data_bench.DataBenchConfig, mosaic_python: str | None,
                run_hf: bool) -> None:
    """Measure both anchors into `report` (a data benchmark's results) and add the goals against them."""
    report.notes.append(f"anchors: run as subprocesses on the same CPU, {cfg.repeats} repeats each; medians reported")
    common = ["--seq-len", str(cfg.seq_len), "--repeats", str(cfg.repeats), "--seed", str(cfg.seed)]
    mosaic_names = ("mosaic_streaming_cold", "mosaic_streaming_warm", "mosaic_streaming_cold_wall",
                    "mosaic_streaming_warm_wall")
    if mosaic_python is None or not Path(mosaic_python).exists():
        reason = (f"no MosaicML venv python at {mosaic_python} (set --mosaic-python or ${MOSAIC_PYTHON_ENV}; "
                  "see docs/BENCHMARKS.md for the venv recipe)")
        result = None
    else:
        result, reason = run_script(mosaic_python, ANCHOR_DIR / "mosaic_stream.py",
                                    [*common, "--work", str(Path(cfg.cache_dir) / "mosaic"), *cfg.inputs])
    if result is None:
        for name in mosaic_names:
            report.add(missing(name, "B/s", reason))
    else:
        how = (f"MDS uint16 windows, zstd, {result['num_shards']} shards, shuffle on, batch_size "
               f"{result['batch_size']}, predownload {result['predownload']}, streaming {result['streaming_version']}")
        cold = "first epoch from a fresh local cache (includes copying + decompressing the shards)"
        warm = "second epoch, shards already decompressed locally"
        report.add(figure_from("mosaic_streaming_cold", result["cold_cpu_bytes_per_s"], "B/s",
                               f"{how}; {cold}; CPU time"))
        report.add(figure_from("mosaic_streaming_warm", result["warm_cpu_bytes_per_s"], "B/s",
                               f"{how}; {warm}; CPU time"))
        report.add(figure_from("mosaic_streaming_cold_wall", result["cold_bytes_per_s"], "B/s", f"{cold}; wall clock"))
        report.add(figure_from("mosaic_streaming_warm_wall", result["warm_bytes_per_s"], "B/s", f"{warm}; wall clock"))

    if run_hf:
        result, reason = run_script(sys.executable, ANCHOR_DIR / "hf_datasets_stream.py", [*common, *cfg.inputs])
    else:
        result, reason = None, "skipped (--no-hf)"
    if result is None:
        report.add(missing("hf_datasets_streaming", "B/s", reason))
        report.add(missing("hf_datasets_streaming_wall", "B/s", reason))
    else:
        how = (f"datasets {result['datasets_version']} streaming json, shuffle buffer 1000 docs, "
               "packed into the same windows")
        report.add(figure_from("hf_datasets_streaming", result["cpu_bytes_per_s"], "B/s", f"{how}; CPU time"))
        report.add(figure_from("hf_datasets_streaming_wall", result["bytes_per_s"], "B/s", f"{how}; wall clock"))

    v = report.value
    report.targets[1:1] = [  # after "stream vs raw zstd decompression", before the start-up goals
        Target("stream vs MosaicML streaming (cold, same zstd path)",
               ratio(v("synergy_stream"), v("mosaic_streaming_cold")), ">=", 2.0),
        Target("stream vs MosaicML streaming (warm, pre-decompressed)",
               ratio(v("synergy_stream"), v("mosaic_streaming_warm")), ">=", 2.0),
        Target("stream vs HF datasets streaming", ratio(v("synergy_stream"), v("hf_datasets_streaming")), ">=", 5.0),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_anchors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", metavar="DIR",
                        help="where JSON + markdown go (default bench_out)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-run the harness (tiny sizes, one repeat): checks it works, numbers mean little")
    data_bench.add_arguments(parser)
    parser.add_argument("--mosaic-python", default=None, metavar="PATH",
                        help="python of the MosaicML streaming venv "
                             f"(default: ${MOSAIC_PYTHON_ENV} or {DEFAULT_MOSAIC_PYTHON})")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face datasets anchor")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.data_anchors", *(sys.argv[1:] if argv is None else argv)])
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    mosaic = args.mosaic_python or os.environ.get(MOSAIC_PYTHON_ENV) or DEFAULT_MOSAIC_PYTHON
    try:
        cfg = data_bench.config_from_args(args)
        with restored_affinity():  # the data benchmark pins this process to one core; the anchors share it
            report = data_bench.run(cfg, command)
            add_anchors(report, cfg, mosaic, run_hf=not args.no_hf)
    except (ValueError, FileNotFoundError) as e:
        print(f"data_anchors: error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = write_results(Path(args.out), [report], stem="data", load_at_start=load_at_start)
    print(md_path.read_text())
    print(f"data_anchors: wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
