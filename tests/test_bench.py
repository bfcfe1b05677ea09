"""synergy-bench harness: report arithmetic and content, profiler attribution, and --quick smoke runs.

Benchmark figures themselves are never asserted (they depend on the machine); the tests check that
the harness measures what it says, computes ratios from its own figures, and reports misses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from benchmarks.anchors.packing import EOD_ID, pack_windows
from synergy_dist.bench.model import scope_times
from synergy_dist.bench.results import (
    BenchResults,
    Target,
    figure_from,
    missing,
    ratio,
    render_markdown,
    to_json,
)

REPO = Path(__file__).resolve().parents[1]


def test_ratio_and_target_status():
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(None, 3.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    assert Target("a", 0.5, ">=", 0.5).status == "met"
    assert Target("a", 0.49, ">=", 0.5).status == "missed"
    assert Target("b", 1.99, "<", 2.0, "s").status == "met"
    assert Target("b", 2.0, "<", 2.0, "s").status == "missed"
    assert Target("c", None, ">=", 1.0).status == "not available"
    with pytest.raises(ValueError, match="Target 'd': op must be '>=' or '<', got '>'"):
        _ = Target("d", 1.0, ">", 0.0).status


def test_figure_is_the_median_and_keeps_repeats():
    figure = figure_from("x", [3.0, 1.0, 2.0, 10.0], "B/s")
    assert figure.value == 2.5
    assert figure.samples == [3.0, 1.0, 2.0, 10.0]
    gone = missing("y", "B/s", "no venv")
    assert gone.value is None and gone.detail == "not available: no venv"


def test_json_and_markdown_content():
    report = BenchResults(name="data", command="synergy-bench data")
    report.add(figure_from("ours", [2e8, 3e8, 2.5e8], "B/s", "our stream"))
    report.add(figure_from("raw", [4e8], "B/s"))
    report.add(missing("mosaic", "B/s", "no venv at /x"))
    report.targets.append(Target("ours vs raw", ratio(report.value("ours"), report.value("raw")), ">=", 0.5))
    report.targets.append(Target("ours vs mosaic", ratio(report.value("ours"), report.value("mosaic")), ">=", 2.0))
    report.notes.append("pinned to one CPU")
    machine = {"date_utc": "2026-01-01 00:00:00 UTC", "nproc": 2, "cpu_model": "CPU-X", "ram_gib": 8.0,
               "load_average_1_5_15": [1.0, 1.0, 1.0], "python": "3.11", "torch": "2"}
    data = to_json(machine, [report])
    entry = data["benchmarks"]["data"]
    assert data["machine"]["cpu_model"] == "CPU-X"
    assert entry["figures"]["ours"]["value"] == 2.5e8
    assert entry["targets"][0]["measured"] == 0.625 and entry["targets"][0]["status"] == "met"
    assert entry["targets"][1]["measured"] is None and entry["targets"][1]["status"] == "not available"
    text = render_markdown(machine, [report])
    assert "2 CPUs (CPU-X), 8.0 GiB RAM" in text
    assert "| ours vs raw | 0.625x | >= 0.5x | met |" in text
    assert "| ours vs mosaic | n/a | >= 2x | not available |" in text
    assert "| ours | 250.0 MB/s | 200.0 MB/s, 300.0 MB/s, 250.0 MB/s | our stream |" in text
    assert "not available: no venv at /x" in text
    assert "- pinned to one CPU" in text


def test_pack_windows_matches_concatenation():
    from data_pipeline.vocab import EOD_ID as PIPELINE_EOD

    assert EOD_ID == PIPELINE_EOD
    docs = [b"hello", b"", b"a longer document here", b"xyz" * 7]
    windows = list(pack_windows(docs, 8))
    stream = np.concatenate([np.append(np.frombuffer(d, np.uint8).astype(np.int64), EOD_ID) for d in docs])
    assert len(windows) == len(stream) // 8
    np.testing.assert_array_equal(np.concatenate(windows), stream[: 8 * len(windows)])
    assert all(w.shape == (8,) and w.dtype == np.int64 for w in windows)


def test_scope_times_attributes_forward_and_backward():
    torch.manual_seed(0)
    heavy = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256, requires_grad=True)

    def step():
        with torch.profiler.record_function("synergy/heavy"):
            h = heavy(x)
            for _ in range(8):
                h = h @ heavy.weight
        with torch.profiler.record_function("synergy/light"):
            y = h.sum()
        y.backward()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    times = scope_times(events)
    assert set(times) == {"heavy", "light"}
    forward_heavy = sum(e.cpu_time_total for e in events if e.name == "synergy/heavy") / 1e6
    assert times["heavy"] > forward_heavy > 0  # the backward matmuls were attributed to it too
    assert times["heavy"] > 5 * times["light"] > 0
    step_span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    assert times["heavy"] + times["light"] <= step_span / 1e6


def _write_corpus(path: Path, n_docs: int = 60) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_docs):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "def f(x):", "return", "\n"], size=200)
        lines.append(json.dumps({"text": f"doc {i} " + " ".join(words)}))
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return path


def _bench(args: list[str], tmp_path: Path, module: str = "synergy_dist.cli.bench") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_data_bench_quick_reports_ratios_and_missing_anchor(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus.jsonl.zst")
    out = tmp_path / "out"
    proc = _bench(["--quick", "--out", str(out), "--corpus", str(corpus), "--cache", str(tmp_path / "cache"),
                   "--mosaic-python", str(tmp_path / "no-venv" / "python")], tmp_path, module="benchmarks.data_anchors")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "data.json").read_text())
    assert {"date_utc", "nproc", "cpu_model", "ram_gib"} <= set(data["machine"])
    bench = data["benchmarks"]["data"]
    figures = bench["figures"]
    for name in ("raw_zstd_decompression", "synergy_stream", "hf_datasets_streaming", "first_batch_seconds",
                 "first_batch_added_peak_rss"):
        assert figures[name]["value"] is not None and figures[name]["value"] > 0, name
        assert len(figures[name]["samples"]) == 1  # --quick: one repeat
    targets = {t["name"]: t for t in bench["targets"]}
    vs_raw = targets["stream vs raw zstd decompression"]
    assert vs_raw["measured"] == figures["synergy_stream"]["value"] / figures["raw_zstd_decompression"]["value"]
    vs_hf = targets["stream vs HF datasets streaming"]
    assert vs_hf["measured"] == figures["synergy_stream"]["value"] / figures["hf_datasets_streaming"]["value"]
    assert vs_hf["status"] == ("met" if vs_hf["measured"] >= 5.0 else "missed")
    mosaic = targets["stream vs MosaicML streaming (cold, same zstd path)"]
    assert mosaic["measured"] is None and mosaic["status"] == "not available"
    assert str(tmp_path / "no-venv" / "python") in figures["mosaic_streaming_cold"]["detail"]
    assert targets["time to first batch, 50 shards"]["measured"] == figures["first_batch_seconds"]["value"]
    markdown = (out / "data.md").read_text()
    assert "| stream vs raw zstd decompression |" in markdown
    assert "Command: `python -m benchmarks.data_anchors --quick" in markdown


@pytest.mark.slow
def test_data_bench_alone_measures_our_stream_and_startup_without_anchors(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus.jsonl.zst")
    out = tmp_path / "out"
    proc = _bench(["data", "--quick", "--out", str(out), "--corpus", str(corpus), "--cache", str(tmp_path / "cache")],
                  tmp_path)
    assert proc.returncode == 0, proc.stderr
    bench = json.loads((out / "data.json").read_text())["benchmarks"]["data"]
    figures = bench["figures"]
    for name in ("raw_zstd_decompression", "synergy_stream", "first_batch_seconds", "first_batch_added_peak_rss"):
        assert figures[name]["value"] is not None and figures[name]["value"] > 0, name
    assert not any(name.startswith(("mosaic", "hf_")) for name in figures)  # the anchors: benchmarks.data_anchors
    targets = {t["name"]: t for t in bench["targets"]}
    assert set(targets) == {"stream vs raw zstd decompression", "time to first batch, 50 shards",
                            "added peak RSS to first batch, 50 shards"}
    assert targets["stream vs raw zstd decompression"]["measured"] == (
        figures["synergy_stream"]["value"] / figures["raw_zstd_decompression"]["value"])


@pytest.mark.slow
def test_model_bench_quick_reports_ratio_and_routing_share(tmp_path):
    out = tmp_path / "out"
    proc = _bench(["model", "--quick", "--out", str(out), "--seq-len", "128", "--synergy-model", "synergy-stride4"],
                  tmp_path)
    assert proc.returncode == 0, proc.stderr
    bench = json.loads((out / "model.json").read_text())["benchmarks"]["model"]
    figures = bench["figures"]
    ours, theirs = figures["synergy_stride4_bytes_per_s"]["value"], figures["byte_transformer_bytes_per_s"]["value"]
    assert ours > 0 and theirs > 0
    assert len(figures["synergy_stride4_bytes_per_s"]["samples"]) == 2  # --quick: two timed steps
    targets = {t["name"]: t for t in bench["targets"]}
    assert targets["synergy-stride4 bytes/s vs byte Transformer (closest parameter count)"]["measured"] == ours / theirs
    share = figures["synergy_stride4_routing_share"]["value"]
    assert 0 < share < 100
    assert targets["synergy-stride4 router + down/upsampling share of step time"]["measured"] == share
    # stride router, every 4th byte of each document opens a concept: about 4 bytes per concept
    assert 2.5 < figures["synergy_stride4_bytes_per_concept"]["value"] <= 4.0
    # the cost of document isolation: the first row with and without, steps alternated in one process
    on, off = figures["isolation_on_bytes_per_s"], figures["isolation_off_bytes_per_s"]
    assert on["value"] > 0 and off["value"] > 0 and len(on["samples"]) == len(off["samples"]) == 2
    assert figures["isolation_speed_ratio"]["samples"] == [a / b for a, b in zip(on["samples"], off["samples"])]
    assert targets["synergy-stride4 bytes/s with document isolation vs without"]["measured"] == (
        on["value"] / off["value"])
    assert "EODs per window" in on["detail"]
    # batched generation: bytes/s at batch 1, 8 and 32, judged as batch 32 vs batch 1
    rates = [figures[f"generate_batch{b}_bytes_per_s"]["value"] for b in (1, 8, 32)]
    assert all(rate > 0 for rate in rates)
    assert targets["synergy-stride4 generated bytes/s at batch 32 vs batch 1"]["measured"] == rates[2] / rates[0]


def test_cli_names_a_missing_corpus(tmp_path):
    proc = _bench(["data", "--quick", "--out", str(tmp_path / "o"), "--corpus", str(tmp_path / "absent.jsonl.zst")],
                  tmp_path)
    assert proc.returncode == 2
    assert f"corpus {tmp_path / 'absent.jsonl.zst'} not found; pass existing --corpus files" in proc.stderr


def test_stopwatch_separates_cpu_from_waiting_and_rss_fields():
    import time

    from synergy_dist.bench.timing import Stopwatch, peak_rss_kib, rss_kib

    clock = Stopwatch()
    time.sleep(0.05)
    assert clock.wall() >= 0.05
    assert clock.cpu() < 0.04  # sleeping uses no CPU: wall time counts it, CPU time does not
    now = rss_kib("VmRSS")
    assert now > 0 and rss_kib("VmHWM") > 0
    # the peak never reads below a reading already taken, even one above VmHWM (which can lag)
    assert peak_rss_kib(now) >= now and peak_rss_kib(now, 10 * now) == 10 * now
    with pytest.raises(RuntimeError, match="/proc/self/status has no VmNope"):
        rss_kib("VmNope")


def test_matched_byte_transformer_is_the_closest():
    from model_configs import tiny_test_config

    from synergy_dist.bench.model import (
        byte_transformer,
        count_params,
        matched_byte_transformer,
    )

    cfg = tiny_test_config()
    target = count_params(cfg)
    kwargs, params = matched_byte_transformer(cfg, target)
    assert kwargs["n_heads"] == cfg.middle.n_heads and abs(kwargs["d_model"] - cfg.d_middle) <= 64
    assert params == count_params(byte_transformer(cfg, **kwargs))
    for depth in (kwargs["depth"] - 1, kwargs["depth"] + 1):  # neighbours at the same width are no closer
        if depth >= 1:
            other = count_params(byte_transformer(cfg, **dict(kwargs, depth=depth)))
            assert abs(params - target) <= abs(other - target)


def test_profiler_labels_time_every_routing_piece_of_a_synergy_model():
    from model_configs import tiny_test_config

    from synergy_dist.bench.model import MIDDLE_SCOPE, ROUTING_SCOPES, label_middle
    from synergy_dist.model.synergy import SynergyLM

    torch.manual_seed(0)
    model = SynergyLM(tiny_test_config(router="cosine"))
    handles = label_middle(model)
    ids = torch.randint(0, 256, (2, 64))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(ids, ids).loss.backward()
    times = scope_times(prof.events())
    for name in (*ROUTING_SCOPES, MIDDLE_SCOPE):  # route_down: router + downsample; smooth_up: smooth + upsample
        assert times.get(name, 0.0) > 0, name
    for handle in handles:
        handle.remove()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(ids, ids)
    assert MIDDLE_SCOPE not in scope_times(prof.events())  # the hooks are gone, the model is as built


def test_anchor_failure_is_reported_with_its_reason(tmp_path):
    from benchmarks.data_anchors import ANCHOR_DIR, run_script
    from synergy_dist.bench.data import last_json_line

    result, reason = run_script("/bin/false", ANCHOR_DIR / "mosaic_stream.py", [])
    assert result is None and reason == "mosaic_stream.py exited with 1: (no output)"
    result, reason = run_script(str(tmp_path / "missing-python"), ANCHOR_DIR / "mosaic_stream.py", [])
    assert result is None and reason.startswith("mosaic_stream.py could not run: ")
    assert last_json_line('noise\n{"a": 1}\nmore noise\n') == {"a": 1}
    with pytest.raises(ValueError, match="no JSON result line in the anchor's output"):
        last_json_line("no json here")


def test_restored_affinity_gives_the_cpus_back_after_pinning():
    from synergy_dist.bench.timing import pin_to_one_core, restored_affinity

    before = os.sched_getaffinity(0)
    with restored_affinity():
        cpu = pin_to_one_core()
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == before


def test_cli_offers_every_benchmark_and_all():
    from synergy_dist.cli.bench import BENCHMARKS, build_parser

    assert list(BENCHMARKS) == ["data", "model", "train"]
    parser = build_parser()
    for name in [*BENCHMARKS, "all"]:
        assert parser.parse_args([name]).benchmark == name
    with pytest.raises(SystemExit):
        parser.parse_args(["speed"])
