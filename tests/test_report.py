"""synergy-report: the plots draw what metrics.jsonl holds, the boundary page marks exactly the model's
concepts (count, text, probabilities), and a missing matplotlib names the extra to install."""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

import eval_helpers as eh
import numpy as np
import pytest
import torch

from data_pipeline.vocab import EOD_ID
from synergy_dist.cli.report import main
from synergy_dist.evaluate import route_text
from synergy_dist.loading import load_model
from synergy_dist.report import ReportError, require_matplotlib
from synergy_dist.report.boundaries_html import concepts, render_html, render_png
from synergy_dist.report.plots import expert_loads, plot_bpb, plot_skipped, read_metrics

SPAN = re.compile(r'<span class="concept" style="background:[^"]+" title="p=([0-9.]+) bytes (\d+)-(\d+)" '
                  r'data-p="[0-9.]+">(.*?)</span>', re.S)
TEXT = "Return a new function object.\n    def f(x):\n        return x + 1  # café, 😀\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return eh.trained_run(tmp_path_factory.getbasetemp() / "eval_run")


@pytest.fixture(scope="module")
def report(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    text = out / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main([run["run"]["dir"], "--text", str(text), "--output", str(out)]) == 0
    return out


def model_concept_count(model, data: bytes) -> int:
    """Boundaries of EOD + data from the model's own statistics, less the EOD's concept."""
    ids = torch.tensor([[EOD_ID, *data]])
    with torch.no_grad():
        stats = model(ids).stats
    return round(float(stats.stages[0].boundary_rate) * ids.shape[1]) - 1


def test_boundary_page_marks_exactly_the_models_concepts(run, report):
    model = load_model(run["run"]["dir"])[0]
    page = (report / "boundaries.html").read_text(encoding="utf-8")
    spans = SPAN.findall(page)
    assert len(spans) == page.count('class="concept"') == model_concept_count(model, TEXT.encode())
    assert "".join(html.unescape(s[3]) for s in spans) == TEXT  # every character shown once, in order
    routed = route_text(model, TEXT.encode())
    starts = [i for i, b in enumerate(routed.boundary) if b]
    assert [int(s[1]) for s in spans] == starts
    assert [int(s[2]) + 1 for s in spans] == starts[1:] + [len(TEXT.encode())]
    for p, start, _, _ in spans:
        assert float(p) == pytest.approx(routed.prob[int(start)], abs=5e-4)
        assert float(p) >= 0.5 - 5e-4  # a boundary is a probability of at least one half
    assert f"{len(spans)} concepts" in page
    assert render_png(routed, report / "again.png") == len(spans)  # the PNG colours the same concepts


def test_concepts_cover_the_text_and_split_characters_stay_whole():
    from synergy_dist.evaluate import RoutedText

    data = "a€b".encode()  # the euro sign is bytes 1..3; a boundary at byte 2 splits it
    routed = RoutedText(data, [1.0, 0.1, 0.9, 0.2, 0.7], [True, False, True, False, True])
    found = concepts(routed)
    assert [(c.start, c.end) for c in found] == [(0, 2), (2, 4), (4, 5)]
    assert [c.text for c in found] == ["a", "€", "b"]  # the split character shows where it completes
    assert render_html(routed).count('class="concept"') == 3


def test_plots_draw_the_metrics(run, report, tmp_path):
    import matplotlib.image

    for name in ("bpb", "lr", "compression", "expert_load", "skipped", "boundaries"):
        image = matplotlib.image.imread(report / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image[..., :3].std() > 0.01, name  # not a blank canvas
    records = read_metrics(Path(run["run"]["dir"]))
    assert [r["step"] for r in records] == list(range(1, eh.STEPS + 1))
    seq_len = run["data"]["seq_len"]
    drawn = plot_bpb(records, seq_len, tmp_path / "bpb.png")
    assert drawn["train"] == ([r["samples_consumed"] * seq_len for r in records], [r["bpb"] for r in records])
    assert drawn["valid"][1] == [r["eval_bpb"] for r in records if "eval_bpb" in r]
    assert len(drawn["valid"][1]) == eh.STEPS // 2  # evaluated every 2 steps
    loads = expert_loads(records)
    assert set(loads) == {"middle.0", "middle.1"}
    for name, (steps, shares) in loads.items():
        counts = np.array([r[f"moe/{name}/tokens_per_expert"] for r in records])
        assert steps == [r["step"] for r in records]
        np.testing.assert_allclose(shares, counts / counts.sum(1, keepdims=True))
    skipped = plot_skipped(records, tmp_path / "skipped.png")
    assert skipped["cumulative"][1] == [r["skipped_steps"] for r in records]


def test_report_defaults_to_the_runs_validation_text(run, tmp_path):
    from data_pipeline.shards import iter_shard_documents

    assert main([run["run"]["dir"], "--output", str(tmp_path), "--max-bytes", "300"]) == 0
    first = next(iter_shard_documents(Path(run["data"]["sample_dir"]) / "valid"))[:300]
    spans = SPAN.findall((tmp_path / "boundaries.html").read_text(encoding="utf-8"))
    assert "".join(html.unescape(s[3]) for s in spans) == first.decode("utf-8", errors="replace")


def test_resumed_steps_keep_the_last_record(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "bpb": 9}\n{"step": 2, "bpb": 8}\n{"step": 2, "bpb": 7}\n')
    assert [(r["step"], r["bpb"]) for r in read_metrics(tmp_path)] == [(1, 9), (2, 7)]


def test_missing_matplotlib_names_the_extra(monkeypatch, run, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ReportError, match=re.escape("pip install synergy-dist[viz]")):
        require_matplotlib()
    assert main([run["run"]["dir"], "--output", str(tmp_path)]) == 2
    assert "pip install synergy-dist[viz]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # failed before writing anything


def test_not_a_run_directory(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'config.yaml'} not found; pass a run directory written by synergy-train" in err


def test_a_run_without_checkpoint_gets_its_curves(run, tmp_path, capsys):
    import shutil

    young = tmp_path / "young_run"
    young.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(Path(run["run"]["dir"]) / name, young / name)
    assert main([str(young)]) == 0
    written = sorted(p.name for p in (young / "report").iterdir())
    assert written == ["bpb.png", "compression.png", "expert_load.png", "lr.png", "skipped.png"]
    assert "no boundary page:" in capsys.readouterr().err
