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

import yaml


def run_config(run_dir: Path):
    from synergy_dist.config import config_from_dict
    from synergy_dist.report import ReportError

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ReportError(f"{path} not found; pass a run directory written by synergy-train")
    return config_from_dict(yaml.safe_load(path.read_text()))


def validation_text(cfg, max_bytes: int) -> bytes:
    """The first document of the run's validation data."""
    from data_pipeline.shards import iter_shard_documents
    from synergy_dist.report import ReportError

    sources = list(cfg.data.valid_sources)
    if not sources and not cfg.data.sources:  # the run trained on the bundled sample corpus
        from synergy_dist.train.trainer import sample_shards

        sources = sample_shards(cfg, is_main=True)[1]  # a no-op when the run already preprocessed it
    for source in sources:
        for document in iter_shard_documents(source):
            if document:
                return document[:max_bytes]
    raise ReportError("the run has no validation text (data.valid_sources is empty); pass --text FILE")


def make_report(run_dir: Path, output: Path, text_file: Path | None, max_bytes: int) -> dict[str, Path]:
    from synergy_dist.evaluate import route_text, stage_routers
    from synergy_dist.loading import LoadError, load_model
    from synergy_dist.report import require_matplotlib
    from synergy_dist.report.boundaries_html import render_html, render_png
    from synergy_dist.report.plots import plot_run

    require_matplotlib()  # fail before any work when it is missing
    cfg = run_config(run_dir)
    targets = [s.router.target_bytes_per_concept for s in cfg.model.stages]
    written = plot_run(run_dir, output, cfg.data.seq_len, targets)
    try:
        model, _, checkpoint = load_model(run_dir)
    except LoadError as err:  # a run before its first checkpoint still gets its curves
        print(f"synergy-report: no boundary page: {err}", file=sys.stderr)
        return written
    if not stage_routers(model):
        print("synergy-report: the model has no router (byte-level model): no boundary page", file=sys.stderr)
        return written
    text = text_file.read_bytes()[:max_bytes] if text_file is not None else validation_text(cfg, max_bytes)
    routed = route_text(model, text)
    title = f"concept boundaries: {checkpoint}"
    written["boundaries_html"] = output / "boundaries.html"
    written["boundaries_html"].write_text(render_html(routed, title), encoding="utf-8")
    written["boundaries_png"] = output / "boundaries.png"
    render_png(routed, written["boundaries_png"])
    return written


def main(argv: list[str] | None = None) -> int:
    from synergy_dist.report import ReportError

    parser = argparse.ArgumentParser(prog="synergy-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory written by synergy-train")
    parser.add_argument("--text", type=Path, default=None, help="text file to mark boundaries on (default: validation text)")
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
        written = make_report(args.run_dir, output, args.text, args.max_bytes)
    except ReportError as err:
        print(f"synergy-report: {err}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name:<16} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
