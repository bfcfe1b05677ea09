"""synergy-report's report of one run: the training-curve plots and, from the newest complete
checkpoint, the router's concept boundaries on a text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.shards import iter_shard_documents
from synergy_dist.config import Config, config_from_dict
from synergy_dist.evaluate import route_text, stage_routers
from synergy_dist.loading import LoadError, load_model
from synergy_dist.report import ReportError, require_matplotlib
from synergy_dist.report.boundaries_html import render_html, render_png
from synergy_dist.report.plots import plot_run
from synergy_dist.train.data import sample_shards


@dataclass
class RunReport:
    written: dict[str, Path] = field(default_factory=dict)  # what was written: name -> file
    notes: list[str] = field(default_factory=list)  # why a part of the report is missing


def run_config(run_dir: Path) -> Config:
    """The training config a run directory was written with."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ReportError(f"{path} not found; pass a run directory written by synergy-train")
    return config_from_dict(yaml.safe_load(path.read_text()))


def validation_text(cfg: Config, max_bytes: int) -> bytes:
    """The first document of the run's validation data, cut to max_bytes."""
    sources = list(cfg.data.valid_sources)
    if not sources and not cfg.data.sources:  # the run trained on the bundled sample corpus
        sources = sample_shards(cfg, is_main=True)[1]  # a no-op when the run already preprocessed it
    for source in sources:
        for document in iter_shard_documents(source):
            if document:
                return document[:max_bytes]
    raise ReportError("the run has no validation text (data.valid_sources is empty); pass --text FILE")


def make_report(run_dir: Path, output: Path, text_file: Path | None, max_bytes: int) -> RunReport:
    """Write the report of `run_dir` into `output`. The boundary page marks text_file's first max_bytes
    bytes, or else the run's first validation document; it is left out, with a note, when the run has
    no complete checkpoint yet or its model has no router."""
    require_matplotlib()  # fail before any work when it is missing
    cfg = run_config(run_dir)
    targets = [s.router.target_bytes_per_concept for s in cfg.model.stages]
    report = RunReport(written=plot_run(run_dir, output, cfg.data.seq_len, targets))
    try:
        model, _, checkpoint = load_model(run_dir)
    except LoadError as err:  # a run before its first checkpoint still gets its curves
        report.notes.append(f"no boundary page: {err}")
        return report
    if not stage_routers(model):
        report.notes.append("the model has no router (byte-level model): no boundary page")
        return report
    text = text_file.read_bytes()[:max_bytes] if text_file is not None else validation_text(cfg, max_bytes)
    routed = route_text(model, text)
    title = f"concept boundaries: {checkpoint}"
    report.written["boundaries_html"] = output / "boundaries.html"
    report.written["boundaries_html"].write_text(render_html(routed, title), encoding="utf-8")
    report.written["boundaries_png"] = output / "boundaries.png"
    render_png(routed, report.written["boundaries_png"])
    return report
