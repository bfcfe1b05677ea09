"""`synergy-report RUN_DIR [--text FILE] [--output DIR] [--max-bytes N]`

Writes into DIR (default RUN_DIR/report):
  bpb.png          train and validation bits per byte vs training bytes seen
  lr.png           learning rate
  compression.png  realised bytes per concept per stage, with the targets
  expert_load.png  per-MoE-layer heatmap of each expert's share of tokens over time
  skipped.png      skipped updates over time
  boundaries.html  a text with the router's concept boundaries (one colour band per concept; hover
                   shows the boundary probability), routed by the newest complete checkpoint
  boundaries.png   the same as an image, for terminals (both skipped, with a note, before the first checkpoint)

The text is --text FILE, or else the first validation document of the run (its data.valid_sources,
or the bundled sample corpus's validation split), cut to --max-bytes bytes.
PNGs need matplotlib: pip install synergy-dist[viz].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synergy_dist.checkpoint.safe_load import UnsafeCheckpointError
from synergy_dist.report import ReportError
from synergy_dist.report.run_report import make_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synergy-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory written by synergy-train")
    parser.add_argument("--text", type=Path, default=None,
                        help="text file to mark boundaries on (default: validation text)")
    parser.add_argument("--output", type=Path, default=None, help="output directory (default RUN_DIR/report)")
    parser.add_argument("--max-bytes", type=int, default=2000, help="bytes of the text to show (default 2000)")
    args = parser.parse_args(argv)
    if args.max_bytes < 1:
        print(f"synergy-report: --max-bytes {args.max_bytes} must be >= 1", file=sys.stderr)
        return 2
    if args.text is not None and not args.text.is_file():
        print(f"synergy-report: --text {args.text} is not a file", file=sys.stderr)
        return 2
    output = args.output or args.run_dir / "report"
    try:
        report = make_report(args.run_dir, output, args.text, args.max_bytes)
    except (ReportError, UnsafeCheckpointError) as err:
        print(f"synergy-report: {err}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"synergy-report: {note}", file=sys.stderr)
    for name, path in report.written.items():
        print(f"{name:<16} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
