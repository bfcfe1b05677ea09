"""`synergy-bench data|model|train|all [--out DIR] [--quick]`: run benchmarks, write JSON + markdown.

Writes OUT/<name>.json and OUT/<name>.md (name = the benchmark, or "all") and prints the markdown.
Each benchmark module offers add_arguments(parser), config_from_args(args) and run(cfg, command).
The research comparisons (quality table, other libraries) run from a checkout: see benchmarks/.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from synergy_dist.bench import data as data_bench  # noqa: E402
from synergy_dist.bench import device as device_bench  # noqa: E402
from synergy_dist.bench import model as model_bench  # noqa: E402
from synergy_dist.bench import train as train_bench  # noqa: E402
from synergy_dist.bench.results import write_results  # noqa: E402
from synergy_dist.bench.timing import restored_affinity  # noqa: E402

BENCHMARKS = {"data": data_bench, "model": model_bench, "train": train_bench}  # `all` runs them in this order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synergy-bench", description=__doc__)
    parser.add_argument("benchmark", choices=[*BENCHMARKS, "all"], help="which benchmark to run")
    parser.add_argument("--out", default="bench_out", metavar="DIR",
                        help="where JSON + markdown go (default bench_out)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-run the harness (tiny sizes, one repeat): checks it works, numbers mean little")
    for name, module in BENCHMARKS.items():
        module.add_arguments(parser.add_argument_group(f"{name} benchmark"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["synergy-bench", *(sys.argv[1:] if argv is None else argv)])
    out_dir = Path(args.out)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    selected = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    benches = []
    try:
        for name in selected:
            module = BENCHMARKS[name]
            cfg = module.config_from_args(args)
            with restored_affinity():  # data and model pin this process to one core
                if getattr(cfg, "device", "cpu") == "cpu":
                    benches.append(module.run(cfg, command))
                for device_cfg in device_bench.configs_for(cfg, args.quick) if name == "model" else []:
                    benches.append(device_bench.run(device_cfg, command))  # --device cuda, or --compile on the CPU
    except (ValueError, FileNotFoundError) as e:
        print(f"synergy-bench: error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = write_results(out_dir, benches, stem=args.benchmark, load_at_start=load_at_start)
    print(md_path.read_text())
    print(f"synergy-bench: wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
