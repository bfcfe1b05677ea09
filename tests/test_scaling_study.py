"""`python -m benchmarks.scaling`: the study's maths, its aggregation of result files, and a tiny resumable run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard

from benchmarks import quality, quality_rows, recipes, scaling
from synergy_dist.bench.model import load_model_config
from synergy_dist.model.accounting import flops_per_byte
from synergy_dist.model.chunking import set_router_warmup
from synergy_dist.model.synergy import SynergyLM

REPO = Path(__file__).resolve().parents[1]
HAS_ANCHOR_LIBS = all(importlib.util.find_spec(m) is not None for m in ("transformers", "tokenizers"))
ZH = ["天下没有不散的筵席。", "知足常乐，能忍自安。"]
WORDS = "the router opens a concept at each word while code keeps its indentation and names".split()


# ---------------------------------------------------------------------------------- maths


def test_loglog_fit_recovers_an_exact_power_law():
    xs = [1e9, 3e9, 2.7e10, 8.1e10]
    fit = scaling.fit_loglog(xs, [10 ** 0.5 * x ** -0.08 for x in xs])
    assert fit.slope == pytest.approx(-0.08, abs=1e-12) and fit.intercept == pytest.approx(0.5, abs=1e-10)
    assert (fit.x_low, fit.x_high, fit.n) == (1e9, 8.1e10, 4)
    assert fit.at(1e12) == pytest.approx(10 ** 0.5 * 1e12 ** -0.08, rel=1e-10)
    assert scaling.fit_loglog([5.0, 5.0], [1.0, 2.0]) is None  # one distinct x: no line


def test_crossover_of_two_lines_at_a_known_compute_and_none_for_parallel_lines():
    # log10 y = 1 - 0.1 log10 x and 0.5 - 0.05 log10 x meet at log10 x = 10; the steeper line is lower beyond
    steep = scaling.fit_loglog([1e8, 1e9], [10 ** (1 - 0.8), 10 ** (1 - 0.9)])
    flat = scaling.fit_loglog([1e8, 1e9], [10 ** (0.5 - 0.4), 10 ** (0.5 - 0.45)])
    c = scaling.crossover(steep, flat, "synergy", "anchor")
    assert c.x == pytest.approx(1e10, rel=1e-9) and not c.inside and c.better_above == "synergy"
    wide = scaling.fit_loglog([1e8, 1e11], [10 ** (1 - 0.8), 10 ** (1 - 1.1)])  # same line, measured past 1e10
    inside = scaling.crossover(wide, flat, "synergy", "anchor")
    assert inside.x == pytest.approx(1e10, rel=1e-9) and inside.inside
    shifted = scaling.fit_loglog([1e8, 1e9], [10 ** (0.9 - 0.8), 10 ** (0.9 - 0.9)])  # parallel to `steep`
    assert scaling.crossover(steep, shifted, "a", "b") == scaling.Crossover(None, False, "")
    # nearly parallel lines meet past 10^308: no crossover, not an overflow (a quick run's noisy fits do this)
    nearly = scaling.Fit(steep.slope + 1e-6, steep.intercept + 0.5, 1e8, 1e9, 2)
    assert scaling.crossover(steep, nearly, "a", "b") == scaling.Crossover(None, False, "")


def test_spread_and_what_counts_as_a_real_difference():
    a, b = scaling.spread([2.0, 2.2]), scaling.spread([2.5, 2.6, 2.7])
    assert (a.mean, a.low, a.high, a.n) == (pytest.approx(2.1), 2.0, 2.2, 2) and b.mean == pytest.approx(2.6)
    assert scaling.real_difference(a, b) == "real"  # 0.5 apart, ranges 0.2
    assert scaling.real_difference(a, scaling.spread([2.15, 2.35])) == "within spread"  # 0.15 apart, range 0.2
    assert scaling.real_difference(a, scaling.spread([3.0])) == "unknown (one seed)"


# ---------------------------------------------------------------------------------- report from hand-written files


def _result(row: str, budget: float, seed: int, bpb: float, lr: float = 2e-3, role: str = "default",
            cpu_s: float | None = None) -> dict:
    flops = 1e9 * budget
    evals = {"pydocs-valid": {"bits_per_byte": bpb, "bytes_per_concept": 3.5 + seed},
             "pystdlib-code-heldout": {"bits_per_byte": bpb - 0.1, "bytes_per_concept": 3.0},
             "zh-fortunes": {"bits_per_byte": bpb + 1.0, "bytes_per_concept": 2.0 + seed}}
    return {"study_row": row, "budget_minutes": budget, "seed": seed, "lr": lr, "lr_role": role, "eval": evals,
            "train_flops": flops * (1 + 0.01 * seed), "train_cpu_s": cpu_s or 60 * budget + seed,
            "train_bytes": 4096 * int(budget * 10)}


def _write_results(out: Path, results: list[dict]) -> None:
    for r in results:
        lr = r["lr"] if r["study_row"] in scaling.ANCHOR_ROWS else None
        path = scaling.run_dir(out, r["study_row"], r["budget_minutes"], r["seed"], lr) / scaling.RESULT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))


def test_report_aggregates_seeds_picks_the_swept_lr_and_the_better_anchor(tmp_path):
    pytest.importorskip("matplotlib")
    anchors = []
    for name, offset in (("llama-bpe-512t-8k", 0.0), ("llama-bpe-512t-32k", 0.05)):  # 8k is the better form
        anchors += [_result(name, 1, 0, 2.40 + offset, 1e-3, "sweep"),
                    _result(name, 1, 0, 2.30 + offset, 2e-3, "sweep"),
                    _result(name, 1, 0, 2.35 + offset, 4e-3, "sweep"),
                    _result(name, 1, 1, 2.34 + offset, 2e-3, "selected"),
                    _result(name, 3, 0, 2.10 + offset, 2e-3, "selected"),
                    _result(name, 3, 0, 1.50 + offset, 4e-3, "selected")]  # not the swept lr: ignored
    synergy = [_result("synergy-cosine", 1, 0, 2.50), _result("synergy-cosine", 1, 1, 2.60),
               _result("synergy-cosine", 3, 0, 2.00), _result("synergy-cosine", 3, 1, 2.10)]
    _write_results(tmp_path, anchors + synergy)
    report, summary = scaling.build_report(tmp_path, "test")
    assert summary["tuned_anchor"] == "llama-bpe-512t-8k"
    assert summary["sweeps"]["llama-bpe-512t-8k"]["lr"] == 2e-3
    assert summary["sweeps"]["llama-bpe-512t-8k"]["sweep"] == {1e-3: 2.40, 2e-3: 2.30, 4e-3: 2.35}
    cell = summary["cells"]["synergy-cosine/1"]["pydocs-valid"]
    assert (cell.mean, cell.low, cell.high, cell.n) == (pytest.approx(2.55), 2.50, 2.60, 2)
    assert summary["cells"]["synergy-cosine/1"]["bytes_per_concept"]["zh-fortunes"].mean == pytest.approx(2.5)
    anchor_small = summary["cells"]["llama-bpe-512t-8k/1"]["pydocs-valid"]  # the swept run + seed 1 at its lr
    assert anchor_small.values == [2.30, 2.34]
    assert summary["cells"]["llama-bpe-512t-8k/3"]["pydocs-valid"].values == [2.10]  # the 4e-3 run is left out
    assert report.value("synergy-cosine/3min/bpb_pydocs-valid") == pytest.approx(2.05)
    # the fits are over the runs' points, from the files
    xs = [r["train_flops"] for r in synergy]
    expected = scaling.fit_loglog(xs, [r["eval"]["pydocs-valid"]["bits_per_byte"] for r in synergy])
    assert summary["fits"]["synergy-cosine/pydocs-valid/train_flops"]["slope"] == pytest.approx(expected.slope)
    assert "synergy-cosine/pydocs-valid/train_cpu_s" in summary["crossovers"]
    table = report.appendix
    assert "| synergy-cosine | 1 | +0.230 | real |" in table  # 2.55 vs 2.32: 0.23 apart, ranges 0.10 and 0.04
    assert "| synergy-cosine | 3 | -0.050 | unknown (one seed) |" in table
    assert "| llama-bpe-512t-8k | 1 | 0.001: 2.400, 0.002: 2.300, 0.004: 2.350 | 0.002 |" in table
    drawn = summary["plots"]["scaling_flops.png"]["synergy-cosine"]["points"]
    assert drawn[0][1:] == (pytest.approx(2.55), 2.50, 2.60)
    assert (tmp_path / "scaling" / "scaling_cpu_seconds.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------- end to end


def _write_corpus(path: Path, docs: list[tuple[str, str]]) -> None:
    lines = "".join(json.dumps({"text": text, "source": source}) + "\n" for source, text in docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """Tiny corpora with the shared files' names and shape, including an evaluation-only Chinese set."""
    directory = tmp_path_factory.mktemp("corpora")
    prose = [(f"python-3.11-docs/library/m{i}.rst.txt", " ".join(WORDS[(i + j) % len(WORDS)] for j in range(120)))
             for i in range(120)]
    code = [(f"cpython-3.11-lib/mod{i}.py", "".join(f"def f{j}(x):\n    return x + {i * j}\n" for j in range(40)))
            for i in range(120)]
    _write_corpus(directory / "pydocs-train.jsonl.zst", prose)
    _write_corpus(directory / "pystdlib-code.jsonl.zst", code)
    _write_corpus(directory / "pydocs-valid.jsonl.zst", [("python-3.11-docs/howto/a.rst.txt", " ".join(WORDS) * 3)])
    _write_corpus(directory / "zh-fortunes.jsonl.zst", [("zh/1", ZH[0]), ("zh/2", ZH[1])])
    return directory


@pytest.mark.skipif(not HAS_ANCHOR_LIBS, reason="the anchor rows need the optional extra 'anchors' "
                    "(transformers, tokenizers): pip install -e '.[anchors]'")
def test_study_runs_resumes_and_reports_from_its_files(corpora, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "benchmarks.scaling", "run", "--out", str(tmp_path), "--corpora", str(corpora),
               "--row", "synergy-stride4", "--row", "llama-bpe", "--budgets", "0.003", "0.02", "--seeds", "1",
               "--lr-sweep", "1", "--eval-bytes", "2000", "--quick", "--core", str(min(os.sched_getaffinity(0)))]
    first = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    paths = sorted((tmp_path / "scaling").glob("*/*/*/result.json"))
    assert [p.relative_to(tmp_path / "scaling").as_posix() for p in paths] == [
        "llama-bpe/0.003/0-lr0.002/result.json", "llama-bpe/0.02/0-lr0.002/result.json",
        "synergy-stride4/0.003/0/result.json", "synergy-stride4/0.02/0/result.json"]
    results = {p.relative_to(tmp_path / "scaling").as_posix(): json.loads(p.read_text()) for p in paths}
    small = results["synergy-stride4/0.003/0/result.json"]
    calibration = json.loads((tmp_path / "scaling" / "synergy-stride4" / "calibration.json").read_text())
    assert small["calibration"] == calibration and small["steps"] >= 2 and small["train_cpu_s"] > 0
    # the smallest budget's bytes at the calibrated speed, the next one's at the speed its training measured
    assert small["train_bytes"] == quality.train_bytes_for_budget(calibration["bytes_per_s_cpu"], 0.003, 4, 128)
    larger = results["synergy-stride4/0.02/0/result.json"]
    assert larger["train_bytes"] == quality.train_bytes_for_budget(small["train_bytes_per_s_cpu"], 0.02, 4, 128)
    assert small["sizing"]["source"] == "the calibration" and "measured at 0.003 min" in larger["sizing"]["source"]
    assert set(small["eval"]) == {"pydocs-valid", "pystdlib-code-heldout", "zh-fortunes"}
    assert small["eval"]["zh-fortunes"]["bytes"] == len("".join(ZH).encode())
    anchor = results["llama-bpe/0.003/0-lr0.002/result.json"]
    selected = results["llama-bpe/0.02/0-lr0.002/result.json"]
    assert anchor["lr_role"] == "sweep" and selected["lr_role"] == "selected"
    assert selected["lr_sweep"] == {"0.002": anchor["eval"]["pydocs-valid"]["bits_per_byte"]}
    mtimes = [p.stat().st_mtime_ns for p in paths]

    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stderr.count("skipped (result exists)") == 4 and "trained" not in second.stderr
    assert [p.stat().st_mtime_ns for p in paths] == mtimes

    study = json.loads((tmp_path / "scaling.json").read_text())["study"]
    cell = study["cells"]["synergy-stride4/0.003"]
    assert cell["pydocs-valid"]["values"] == [small["eval"]["pydocs-valid"]["bits_per_byte"]]
    assert cell["zh-fortunes"]["mean"] == small["eval"]["zh-fortunes"]["bits_per_byte"]
    assert cell["train_flops"]["mean"] == small["train_flops"]
    assert study["sweeps"]["llama-bpe"]["lr"] == 2e-3
    assert study["tuned_anchor"] == "llama-bpe"  # the only anchor form that ran
    assert "synergy-stride4/pydocs-valid/train_flops" in study["crossovers"]
    xs = [results[f"synergy-stride4/{b}/0/result.json"]["train_cpu_s"] for b in ("0.003", "0.02")]
    ys = [results[f"synergy-stride4/{b}/0/result.json"]["eval"]["pydocs-valid"]["bits_per_byte"]
          for b in ("0.003", "0.02")]
    fit = study["fits"]["synergy-stride4/pydocs-valid/train_cpu_s"]
    slope = (math.log10(ys[1]) - math.log10(ys[0])) / (math.log10(xs[1]) - math.log10(xs[0]))
    assert fit["slope"] == pytest.approx(slope)
    markdown = (tmp_path / "scaling.md").read_text()
    assert "## scaling" in markdown and "| synergy-stride4 | 0.003 |" in markdown


def test_larger_budgets_are_sized_by_the_throughput_measured_at_the_smaller_one(tmp_path):
    row = tmp_path / "scaling" / "synergy-cosine"
    step = 8 * 512
    assert scaling.budget_bytes(row, 1, 1000.0, 8, 512) == {"train_bytes": 14 * step, "source": "the calibration"}
    for seed, rate in ((0, 1100.0), (1, 1300.0)):  # runs of the smallest budget, sized by the calibration
        scaling._write_json(row / "1" / f"{seed}" / scaling.RESULT,
                            {"budget_minutes": 1, "train_bytes": 14 * step, "train_bytes_per_s_cpu": rate})
    assert scaling.budget_bytes(row, 1, 1000.0, 8, 512)["train_bytes"] == 14 * step  # the budget's bytes, kept
    sized = scaling.budget_bytes(row, 3, 1000.0, 8, 512)
    assert sized["train_bytes"] == (1200 * 180 // step) * step and "measured at 1 min" in sized["source"]
    scaling._write_json(row / "3" / "0" / scaling.RESULT, {"budget_minutes": 3, "train_bytes": 123,
                                                           "train_bytes_per_s_cpu": 900.0, "sizing": sized})
    assert scaling.budget_bytes(row, 3, 1000.0, 8, 512) == sized  # seed 1 trains seed 0's bytes
    assert "measured at 3 min" in scaling.budget_bytes(row, 9, 1000.0, 8, 512)["source"]


def test_a_seed_changes_the_initialisation_not_the_data(corpora):
    cfg = quality.QualityConfig(corpora=str(corpora), seq_len=64, code_heldout_fraction=0.2)
    other = quality.QualityConfig(**{**cfg.__dict__, "init_seed": 1})
    assert quality.training_documents(other) == quality.training_documents(cfg)
    assert quality.evaluation_sets(other) == quality.evaluation_sets(cfg)
    a, b = (quality.synergy_row("synergy-cosine", c).module.state_dict() for c in (cfg, other))
    assert any(not a[k].equal(b[k]) for k in a if a[k].is_floating_point())


def test_bad_study_settings_fail_with_one_line_naming_the_fix(corpora, tmp_path):
    cfg = scaling.StudyConfig(rows=["nope"])
    with pytest.raises(ValueError, match=r"scaling rows \['nope'\] are unknown; choose from"):
        cfg.validate()
    cfg = scaling.StudyConfig(rows=["synergy-cosine"], budgets=[1, 2, 3], seeds=[1, 2])
    with pytest.raises(ValueError, match=r"scaling --seeds \[1, 2\] must be one count >= 1, or one per budget \(3\)"):
        cfg.validate()
    cfg = scaling.StudyConfig(rows=["synergy-cosine"])
    cfg.quality.corpora = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found in .*; pass --corpora DIR"):
        cfg.validate()
    with pytest.raises(FileNotFoundError, match=r"no scaling results .* run `python -m benchmarks.scaling run"):
        scaling.load_runs(tmp_path)


def test_the_evaluation_only_sets_are_capped_unless_asked_whole():
    parse = scaling.build_parser().parse_args
    assert scaling.config_from_args(parse(["run"])).quality.extra_eval_bytes == 262_144
    assert scaling.config_from_args(parse(["run", "--extra-eval-bytes", "0"])).quality.extra_eval_bytes == 0


# ---------------------------------------------------------------------------------- recipes (section 2's variants)


def test_a_recipe_trains_row_1_with_its_overrides_and_lr_multiple(corpora, tmp_path, monkeypatch):
    jobs = []

    def fake_worker(job, timeout_s, entry):  # records what the run's process would be given
        jobs.append(job)
        return {"job": job}, ""

    monkeypatch.setattr(quality, "run_worker", fake_worker)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: None)
    cfg = scaling.StudyConfig(out=str(tmp_path), rows=["recipe-n8-wide", "recipe-lr-half"], budgets=[1.0], seeds=[1])
    cfg.quality.corpora = str(corpora)
    scaling.run_study(cfg, log=lambda line: None)
    by_row = {job["row"]: job for job in jobs}
    assert by_row["recipe-n8-wide"]["cfg"]["model_overrides"] == recipes.RECIPES["recipe-n8-wide"].overrides
    assert by_row["recipe-n8-wide"]["lr"] == cfg.quality.lr
    half = by_row["recipe-lr-half"]
    assert half["lr"] == 0.5 * cfg.quality.lr and half["cfg"]["model_overrides"] == []
    assert all(job["cfg"]["rows"] == ["synergy-cosine"] for job in jobs)  # row 1 is what a recipe changes
    # a recipe at row 1's cost trains row 1's bytes (its calibration); one that changes the cost calibrates itself
    assert half["calibration"] == str(tmp_path / "scaling" / "synergy-cosine" / "calibration.json")
    held = f"model.stages.0.router.warmup_steps={scaling.CALIBRATION_ROUTER_HOLD}"  # the router at its target
    assert half["calibration_overrides"] == [held]
    wide = by_row["recipe-n8-wide"]
    assert wide["calibration"] == str(tmp_path / "scaling" / "recipe-n8-wide" / "calibration.json")
    assert wide["calibration_overrides"] == [*wide["cfg"]["model_overrides"], held]
    assert (tmp_path / "scaling" / "recipe-n8-wide" / "1" / "0" / "result.json").is_file()

    # the worker builds row 1 with the overrides: the model it trains is the recipe's
    row = quality.synergy_row("synergy-cosine", quality.QualityConfig(**by_row["recipe-n8-wide"]["cfg"]))
    model_cfg = row.details["model_config"]
    assert (model_cfg["d_middle"], model_cfg["middle"]["repeat"]) == (320, 4)
    assert model_cfg["stages"][0]["router"]["target_bytes_per_concept"] == 8.0


def test_recipes_that_change_the_compression_keep_row_1s_flops_per_byte():
    reference = quality_rows.reference_flops_per_byte(512)
    for name, recipe in recipes.RECIPES.items():
        cfg = quality_rows.with_overrides(quality_rows.default_config(), recipe.overrides)
        if cfg.stages[0].router.target_bytes_per_concept != 4.0:
            assert abs(flops_per_byte(cfg, 512) / reference - 1) < 0.05, name


def test_the_calibration_times_a_learned_router_at_its_target_compression():
    # the model the calibration runs: every learned router held by its warm-up at a boundary every round(N)
    # bytes, the learned router still computed: the design's FLOPs at N, whatever the router's first steps do
    for name in ("synergy-cosine", "synergy-gate", "synergy-mod-middle", "recipe-n8-deep", "recipe-router-warmup",
                 "recipe-attention-encdec-warmup"):
        base = quality_rows.model_config(scaling.quality_row(name), 512)
        row_cfg = quality_rows.with_overrides(base, scaling.recipe_overrides(name))
        timed = quality_rows.with_overrides(base, scaling.calibration_overrides(name, 512))
        assert timed.stages[0].router.kind == row_cfg.stages[0].router.kind, name
        assert flops_per_byte(timed, 512) == flops_per_byte(row_cfg, 512), name
        torch.manual_seed(0)
        model = SynergyLM(timed).eval()
        set_router_warmup(model, 2 * scaling.StudyConfig().calibration_warmup)  # past the calibration's steps
        with torch.no_grad():
            stats = model(torch.randint(0, 256, (1, 512))).stats.stages[0]
        n = round(row_cfg.stages[0].router.target_bytes_per_concept)
        assert stats.concepts.item() == 512 // n, name
    held = f"model.stages.0.router.warmup_steps={scaling.CALIBRATION_ROUTER_HOLD}"
    assert scaling.calibration_overrides("recipe-router-warmup", 512) == [held]  # in place of its own warm-up
    # rows without a learned router are timed as they train
    for name in ("synergy-stride4", "byte-transformer", "llama-bpe", "llama-bpe-512t-32k"):
        assert scaling.calibration_overrides(name, 512) == [], name


def test_the_configs_model_is_the_best_recipe_and_row_1_stays_as_measured():
    config_model = load_model_config("configs/tiny-cpu.yaml")
    row_1 = quality_rows.default_config()
    assert quality_rows.with_overrides(row_1, recipes.RECIPES["recipe-flat-ratio-0.1"].overrides) == config_model
    assert config_model.lr_multipliers() == [1.0, 1.0]
    assert config_model.stages[0].router.ratio_loss_coef == 0.1
    # what the study measured as row 1: H-Net Eq. 11's multipliers and H-Net's ratio-loss weight
    assert [round(m, 2) for m in row_1.lr_multipliers()] == [3.03, 1.07]
    assert row_1.stages[0].router.ratio_loss_coef == 0.03


def test_a_bad_recipe_override_fails_with_one_line_naming_it():
    base = quality_rows.default_config()
    with pytest.raises(ValueError, match=r"must start with 'model.' \(e.g. model.d_middle=320\)"):
        quality_rows.with_overrides(base, ["train.lr=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'model.d_midle'"):
        quality_rows.with_overrides(base, ["model.d_midle=320"])


def test_a_row_measured_at_one_budget_gets_no_line(tmp_path):
    pytest.importorskip("matplotlib")
    # two seeds at one budget differ in FLOPs and CPU seconds by noise only: a line through them would mean nothing
    _write_results(tmp_path, [_result("synergy-cosine", 1, 0, 2.50), _result("synergy-cosine", 1, 1, 2.60),
                              _result("synergy-gate", 1, 0, 2.50), _result("synergy-gate", 3, 0, 2.40)])
    _, summary = scaling.build_report(tmp_path, "test")
    assert not any(key.startswith("synergy-cosine/") for key in summary["fits"])
    assert "synergy-gate/pydocs-valid/train_flops" in summary["fits"]


def test_the_tuned_anchor_is_the_strongest_form_whatever_its_window(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_result("llama-bpe-512t-8k", 1, 0, 2.60, 2e-3, "sweep"), _result("llama-bpe-512t-32k", 1, 0, 2.50, 2e-3,
                                                                             "sweep"),
            _result("llama-bpe", 1, 0, 2.45, 1e-3, "sweep"), _result("llama-bpe", 1, 0, 2.55, 2e-3, "sweep"),
            _result("synergy-cosine", 1, 0, 3.0)]
    _write_results(tmp_path, runs)
    _, summary = scaling.build_report(tmp_path, "test")
    assert summary["tuned_anchor"] == "llama-bpe"  # 2.45 at its best lr, below both natural forms


def test_each_synergy_point_is_compared_with_the_anchors_line_at_its_own_compute(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_result("llama-bpe", 1, 0, 2.0, 2e-3, "sweep"), _result("llama-bpe", 4, 0, 1.0, 2e-3, "selected"),
            _result("synergy-cosine", 2, 0, 1.5), _result("synergy-cosine", 8, 0, 0.9)]
    _write_results(tmp_path, runs)
    _, summary = scaling.build_report(tmp_path, "test")
    at_2 = summary["equal_x"]["synergy-cosine/2/pydocs-valid/train_flops"]
    assert at_2["x"] == pytest.approx(2e9) and at_2["synergy"] == pytest.approx(1.5)
    assert at_2["anchor_line"] == pytest.approx(2.0 * 2 ** -0.5) and at_2["inside"]  # slope -1/2 through (1e9, 2)
    assert not summary["equal_x"]["synergy-cosine/8/pydocs-valid/train_flops"]["inside"]  # beyond 4e9: extrapolated


def test_compression_compares_only_runs_that_read_the_same_text(tmp_path):
    pytest.importorskip("matplotlib")
    whole, capped = _result("synergy-cosine", 1, 0, 3.0), _result("synergy-cosine", 1, 1, 3.1)
    for run, size in ((whole, 2000), (capped, 500)):
        for name in run["eval"]:
            run["eval"][name]["bytes"] = 9000 if name != "zh-fortunes" else size
    _write_results(tmp_path, [whole, capped])
    _, summary = scaling.build_report(tmp_path, "test")
    per_text = summary["cells"]["synergy-cosine/1"]["bytes_per_concept"]
    assert per_text["zh-fortunes (2,000 B)"].values == [2.0] and per_text["zh-fortunes (500 B)"].values == [3.0]
    assert per_text["pydocs-valid"].values == [3.5, 4.5]  # one text: one column under the set's name


def test_the_tuned_anchor_is_chosen_at_the_largest_budget_two_forms_reached(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_result("llama-bpe-512t-8k", 1, 0, 2.60, 2e-3, "sweep"),  # lost to 32k at 1 min: not run further
            _result("llama-bpe-512t-32k", 1, 0, 2.50, 2e-3, "sweep"), _result("llama-bpe", 1, 0, 2.45, 2e-3, "sweep"),
            _result("llama-bpe-512t-32k", 3, 0, 2.10, 2e-3), _result("llama-bpe", 3, 0, 2.20, 2e-3),
            _result("llama-bpe", 9, 0, 1.90, 2e-3), _result("synergy-cosine", 1, 0, 3.0)]
    _write_results(tmp_path, runs)
    _, summary = scaling.build_report(tmp_path, "test")
    assert summary["tuned_anchor"] == "llama-bpe-512t-32k"  # better at 3 min, the largest budget both reached


def test_an_lr_tried_at_a_larger_budget_is_shown_apart_and_never_chosen_from(tmp_path):
    pytest.importorskip("matplotlib")
    # "36" sorts before "4" on disk: the larger budget's lone sweep run must not stand in for the sweep
    runs = [_result("llama-bpe", 4, 0, 2.45, 1e-3, "sweep"), _result("llama-bpe", 4, 0, 2.35, 2e-3, "sweep"),
            _result("llama-bpe", 36, 0, 1.89, 1e-3, "sweep"), _result("llama-bpe", 36, 0, 1.91, 2e-3, "selected")]
    _write_results(tmp_path, runs)
    report, summary = scaling.build_report(tmp_path, "test")
    sweep = summary["sweeps"]["llama-bpe"]
    assert (sweep["budget"], sweep["lr"], sweep["sweep"]) == (4, 2e-3, {1e-3: 2.45, 2e-3: 2.35})
    assert sweep["others"] == {36: {1e-3: 1.89}}
    assert summary["cells"]["llama-bpe/36"]["pydocs-valid"].values == [1.91]  # the chosen lr's run only
    assert "| llama-bpe | 36 (seed 0, outside the sweep) | 0.001: 1.890 | 0.002 (the sweep's) |" in report.appendix


def test_seeds_added_at_a_larger_budget_reuse_the_anchors_sweep(tmp_path):
    assert scaling.sweep_budget(tmp_path, "llama-bpe", [36]) == 36  # nothing swept yet: sweep at the smallest asked
    _write_results(tmp_path, [_result("llama-bpe", 4, 0, 2.35, 2e-3, "sweep"),
                              _result("llama-bpe", 12, 0, 2.2, 2e-3, "selected")])
    assert scaling.sweep_budget(tmp_path, "llama-bpe", [36]) == 4
    assert scaling.sweep_budget(tmp_path, "llama-bpe", [1, 36]) == 1  # a smaller budget asked for sweeps anew
