"""`python -m benchmarks.quality`: the harness and its arithmetic on tiny synthetic text (never benchmark figures)."""

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

from benchmarks import quality
from benchmarks.anchors import llama_bpe
from benchmarks.quality_rows import (
    BYTE_TRANSFORMER_ROW,
    MOE_EXPERTS,
    default_config,
    model_config,
    moe_middle_config,
    reference_flops_per_byte,
)
from data_pipeline.vocab import EOD_ID, PAD_ID
from synergy_dist.evaluate import windows as windows_of_bytes
from synergy_dist.model.accounting import flops_per_byte, param_counts
from synergy_dist.model.synergy import SynergyLM
from synergy_dist.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
HAS_ANCHOR_LIBS = all(importlib.util.find_spec(m) is not None for m in ("transformers", "tokenizers"))
needs_anchor_libs = pytest.mark.skipif(not HAS_ANCHOR_LIBS, reason="row 7 needs the optional extra 'anchors' "
                                       "(transformers, tokenizers): pip install -e '.[anchors]'")
WORDS = "the router opens a concept at each word while code keeps its indentation and names".split()


def _write_corpus(path: Path, docs: list[tuple[str, str]]) -> None:
    lines = "".join(json.dumps({"text": text, "source": source}) + "\n" for source, text in docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """Three tiny corpora with the real files' names, sources and shape (prose, code, held-out prose)."""
    directory = tmp_path_factory.mktemp("corpora")
    prose = [(f"python-3.11-docs/library/m{i}.rst.txt", " ".join(WORDS[(i + j) % len(WORDS)] for j in range(120)))
             for i in range(30)]
    code = [(f"cpython-3.11-lib/mod{i}.py", "".join(f"def f{j}(x):\n    return x + {i * j}\n" for j in range(40)))
            for i in range(30)]
    valid = [("python-3.11-docs/howto/a.rst.txt", "héllo wörld, the router opens a concept"),
             ("python-3.11-docs/library/b.rst.txt", " ".join(WORDS[::-1]) * 3)]
    _write_corpus(directory / "pydocs-train.jsonl.zst", prose)
    _write_corpus(directory / "pystdlib-code.jsonl.zst", code)
    _write_corpus(directory / "pydocs-valid.jsonl.zst", valid)
    return directory


# ---------------------------------------------------------------------------------- arithmetic


def test_bits_per_byte_matches_a_hand_computation():
    # 3 tokens covering 7 UTF-8 bytes ("héllo" is 6 bytes + 1) with probabilities 1/2, 1/4, 1/8: 1 + 2 + 3 = 6 bits
    nats = -(math.log(1 / 2) + math.log(1 / 4) + math.log(1 / 8))
    assert quality.bits_per_byte(nats, len("héllo!".encode())) == pytest.approx(6 / 7, rel=1e-12)
    with pytest.raises(ValueError, match="bits_per_byte needs a positive byte count, got 0"):
        quality.bits_per_byte(1.0, 0)


def test_bits_per_byte_of_a_bpe_model_equals_the_byte_level_chain_rule():
    """A token-level model whose token probability is the product of its bytes' probabilities must score the
    same bits per byte as the byte-level model: the conversion divides by UTF-8 bytes, not tokens."""
    torch.manual_seed(0)
    byte_probs = torch.rand(12) * 0.9 + 0.05  # probability of each of 12 bytes
    byte_nats = float(-byte_probs.log().sum())
    tokens = [byte_probs[0:3], byte_probs[3:4], byte_probs[4:9], byte_probs[9:12]]  # 4 tokens of 3, 1, 5, 3 bytes
    token_nats = sum(float(-t.prod().log()) for t in tokens)
    assert quality.bits_per_byte(token_nats, 12) == pytest.approx(quality.bits_per_byte(byte_nats, 12), rel=1e-6)
    assert quality.bits_per_byte(byte_nats, 12) == pytest.approx(byte_nats / 12 / math.log(2), rel=1e-12)


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    schedule = quality.training_config(quality.QualityConfig(lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1), 20)
    lrs = [lr_at(s, schedule) for s in range(20)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # warm-up of round(0.1 * 20) = 2 steps
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_budget_arithmetic_rounds_down_to_whole_steps():
    # 1000 B/s for 1.5 min = 90000 bytes; steps of 8 x 512 = 4096 bytes -> 21 whole steps
    assert quality.train_bytes_for_budget(1000.0, 1.5, 8, 512) == 21 * 4096
    assert quality.train_bytes_for_budget(1.0, 0.01, 8, 512) == 2 * 4096  # never fewer than 2 steps
    assert quality.QualityConfig(train_bytes=21 * 4096 + 100).steps() == 21


def test_equal_flops_rows_are_matched_to_row_one():
    seq_len = 512
    target = reference_flops_per_byte(seq_len)
    assert target == flops_per_byte(default_config(), seq_len)
    byte_model = model_config(BYTE_TRANSFORMER_ROW.name, seq_len)
    assert byte_model.stages == [] and byte_model.middle.pos_encoding == "rope"
    assert abs(flops_per_byte(byte_model, seq_len) / target - 1) < 0.05
    # the Llama anchor: per-token FLOPs / bytes per token is within 5% of the target for a plausible 3.5 B/token
    size = llama_bpe.choose_size(target, 3.5, 146, 8192, target_params=3_000_000)
    assert abs(llama_bpe.flops_per_token(size, 146) / 3.5 / target - 1) <= 0.05
    # and the measured FLOPs of a step are per-byte FLOPs x bytes: with realised compression 4 (the target),
    # the reference row's step costs exactly target x bytes
    assert flops_per_byte(default_config(), seq_len, [4.0]) * 8 * seq_len == pytest.approx(target * 8 * seq_len)


@needs_anchor_libs
def test_llama_flops_and_params_by_hand():
    size = llama_bpe.LlamaSize(vocab_size=100, hidden=8, layers=2, heads=2, intermediate=24)
    # per layer: 2*4*64 (projections) + 2*2*2.5*8 (attention over (4+1)/2 keys) + 2*3*8*24 (SwiGLU); head 2*8*100
    forward = 2 * (512 + 80 + 1152) + 1600
    assert llama_bpe.flops_per_token(size, 4, training=False) == forward
    assert llama_bpe.flops_per_token(size, 4) == 3 * forward
    model = llama_bpe.build_model(size, 8, seed=0)
    assert llama_bpe.param_count(size) == sum(p.numel() for p in model.parameters())


def test_moe_row_has_the_active_parameters_of_row_one_plus_its_routers():
    dense, moe = default_config(), moe_middle_config()
    dense_counts, moe_counts = param_counts(SynergyLM(dense)), param_counts(SynergyLM(moe))
    routers = len(moe.middle.layers) * MOE_EXPERTS * moe.d_middle
    assert moe_counts["active"] - routers == dense_counts["active"]
    assert moe_counts["total"] > dense_counts["total"]  # 4 half-width experts hold twice the dense MLP
    assert flops_per_byte(moe, 512) == pytest.approx(flops_per_byte(dense, 512) + 3 * 2 * routers / 4, rel=1e-12)


def test_token_windows_predict_every_unit_once_like_the_library():
    windows = quality.token_windows([[10, 11, 12, 13, 14]], separator=256, pad=257, seq_len=2)
    assert windows == [[256, 10, 11], [11, 12, 13], [13, 14, 256]]
    inputs, labels = quality.token_window_batch(windows, separator=256)
    assert inputs.tolist()[-1] == [13, 14] and labels.tolist()[-1] == [14, -100]  # the separator is not counted
    assert sorted(u for u in labels.flatten().tolist() if u != -100) == [10, 11, 12, 13, 14]
    docs = [b"hello", b"", b"a longer document", b"xyz" * 5]  # the BPE row's windows are synergy_dist.evaluate's
    for seq_len in (1, 3, 8, 64):
        ours = quality.token_windows([list(d) for d in docs], EOD_ID, PAD_ID, seq_len)
        assert ours == [w.tolist() for w in windows_of_bytes(docs, seq_len)]


def test_token_stream_covers_the_byte_budget_in_whole_steps():
    byte_length = [1, 1, 2, 3]  # id 0 = separator (1 byte), ids 1..3 stand for 1, 2, 3 bytes
    docs = [[1, 2, 3], [3, 3], [2, 2, 2, 2]]
    stream, steps, trained = quality.token_stream_for_bytes(docs, 0, byte_length, train_bytes=9, tokens_per_step=2)
    # labels of "0 1 2 3 0 3 3 0 2 2 2 2": 1,2,3,1,3 -> 10 bytes >= 9 after 5 labels -> 3 steps of 2 = 6 labels
    assert steps == 3 and stream == [0, 1, 2, 3, 0, 3, 3] and trained == 1 + 2 + 3 + 1 + 3 + 3
    with pytest.raises(ValueError, match="fewer than the .* the budget needs; lower --train-bytes"):
        quality.token_stream_for_bytes(docs, 0, byte_length, train_bytes=100, tokens_per_step=2)


def test_held_out_split_is_deterministic_and_keyed_by_seed():
    sources = [f"cpython-3.11-lib/m{i}.py" for i in range(2000)]
    picked = [s for s in sources if quality.held_out(s, 0.03, 0)]
    assert picked == [s for s in sources if quality.held_out(s, 0.03, 0)]
    assert 20 < len(picked) < 100
    assert picked != [s for s in sources if quality.held_out(s, 0.03, 1)]


def test_bad_settings_fail_with_the_key_and_the_fix(corpora, tmp_path):
    with pytest.raises(ValueError, match=r"quality rows \['nope'\] are unknown; choose from"):
        quality.QualityConfig(corpora=str(corpora), rows=["nope"], train_bytes=4096).validate()
    with pytest.raises(ValueError, match="bpe_vocab=4096 must be in 8192..32768"):
        quality.QualityConfig(corpora=str(corpora), train_bytes=4096, bpe_vocab=4096).validate()
    with pytest.raises(FileNotFoundError, match=r"not found in .*; pass --corpora DIR"):
        quality.QualityConfig(corpora=str(tmp_path), train_bytes=4096).validate()


def test_evaluation_only_sets_have_their_own_cap_in_whole_documents(corpora):
    whole = quality.evaluation_sets(quality.QualityConfig(corpora=str(corpora), extra_eval=["pystdlib-code.jsonl.zst"]))
    first_doc = len(whole["pystdlib-code"][0][1].encode())
    capped = quality.evaluation_sets(quality.QualityConfig(
        corpora=str(corpora), extra_eval=["pystdlib-code.jsonl.zst"], extra_eval_bytes=first_doc + 1))
    assert capped["pystdlib-code"] == whole["pystdlib-code"][:2]  # the document that crosses the cap is kept
    assert capped["pydocs-valid"] == whole["pydocs-valid"]  # the evaluation proper stays whole
    both = quality.evaluation_sets(quality.QualityConfig(
        corpora=str(corpora), extra_eval=["pystdlib-code.jsonl.zst"], eval_bytes=first_doc))
    assert both["pystdlib-code"] == whole["pystdlib-code"][:1]  # without its own cap, eval_bytes applies
    with pytest.raises(ValueError, match=r"extra_eval_bytes=-1 must be >= 0 \(0 = the whole set\)"):
        quality.QualityConfig(corpora=str(corpora), train_bytes=4096, extra_eval_bytes=-1).validate()


def test_llama_row_without_its_libraries_fails_with_the_install_command(corpora, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"row 'llama-bpe' needs \['transformers'\]: pip install -e '.\[anchors\]'"):
        quality.QualityConfig(corpora=str(corpora), train_bytes=4096).validate()
    quality.QualityConfig(corpora=str(corpora), train_bytes=4096, rows=["synergy-cosine"]).validate()  # no row 7: fine


# ---------------------------------------------------------------------------------- end to end


def _tiny_cfg(corpora: Path, work: Path, rows: list[str]) -> quality.QualityConfig:
    return quality.QualityConfig(corpora=str(corpora), rows=rows, train_bytes=3 * 2 * 64, seq_len=64, batch_size=2,
                                 eval_bytes=2000, bpe_vocab=8192, work_dir=str(work), code_heldout_fraction=0.2)


@pytest.mark.parametrize("row", ["synergy-cosine", "byte-transformer",
                                 pytest.param("llama-bpe", marks=needs_anchor_libs)])
def test_one_row_trains_and_evaluates_consistently(corpora, tmp_path, row):
    cfg = _tiny_cfg(corpora, tmp_path, [row])
    result = quality.run_row(row, cfg)
    if row == "llama-bpe":
        # whole steps of tokens that first cover the byte budget (the tiny text compresses well: few steps)
        assert result["steps"] >= 1 and cfg.train_bytes <= result["train_bytes"]
        assert result["bpe_vocab"] <= 8192 and result["seq_len_tokens"] >= 8
    else:
        assert result["steps"] == 3 and result["train_bytes"] == 3 * 2 * 64
        assert result["train_flops"] == pytest.approx(result["train_flops_per_byte"] * 3 * 2 * 64)
    valid = result["eval"]["pydocs-valid"]
    assert valid["bytes"] == sum(len(t.encode()) for t in ("héllo wörld, the router opens a concept",
                                                           " ".join(WORDS[::-1]) * 3))
    assert valid["documents"] == 2 and set(valid["groups"]) == {"howto", "library"}
    assert valid["nats"] == pytest.approx(sum(g["nats"] for g in valid["groups"].values()))
    assert valid["bits_per_byte"] == pytest.approx(valid["nats"] / (math.log(2) * valid["bytes"]))
    if row == "llama-bpe":
        assert valid["bytes_per_unit"] > 1.0 and valid["bytes_per_concept"] == valid["bytes_per_unit"]
    elif row == "byte-transformer":  # every byte is its own unit
        assert valid["units"] == valid["bytes"] and valid["bytes_per_concept"] == 1.0
    else:
        assert valid["units"] == valid["bytes"] and valid["bytes_per_unit"] == 1.0
        assert 1.0 < valid["bytes_per_concept"] <= valid["bytes"]
    assert result["train_flops"] > 0 and result["rss_start_mib"] > 0
    assert result["peak_rss_mib"] >= result["peak_rss_train_mib"] >= result["rss_with_text_and_model_mib"]
    assert "pystdlib-code-heldout" in result["eval"]


def test_run_reports_every_row_and_the_goals(corpora, tmp_path):
    cfg = _tiny_cfg(corpora, tmp_path, ["synergy-cosine", "byte-transformer"])
    cpus = os.sched_getaffinity(0)
    try:
        report = quality.run(cfg, "test")
    finally:  # run() pins this process to one core; give the rest of the test session its cores back
        os.sched_setaffinity(0, cpus)
    assert report.value("synergy-cosine/train_flops_vs_row1") == 1.0
    assert 0 < report.value("byte-transformer/train_flops_vs_row1")
    bpb1 = report.value("synergy-cosine/bpb_pydocs_valid")
    bpb6 = report.value("byte-transformer/bpb_pydocs_valid")
    compute, quality_goal = report.targets
    flops_ratio = report.value("byte-transformer/train_flops_vs_row1")
    assert compute.measured == pytest.approx(abs(flops_ratio - 1)) and compute.threshold == quality.FLOPS_TOLERANCE
    assert quality_goal.measured == pytest.approx(bpb1 / bpb6) and quality_goal.op == "<"
    saved = json.loads((tmp_path / "synergy-cosine.json").read_text())
    assert saved["eval"]["pydocs-valid"]["bits_per_byte"] == bpb1
    assert any(note.startswith("row 1 synergy-cosine: pydocs-valid") for note in report.notes)
    table = quality.markdown_table(quality.load_results([str(tmp_path)])).splitlines()
    assert (len(table) == 4 and table[2].startswith("| 1 | synergy-cosine")
            and table[3].startswith("| 6 | byte-transformer"))
    assert f"| {bpb1:.3f} |" in table[2] and "| 1.00x |" in table[2]


def test_command_line_quick_run_writes_json_and_markdown(corpora, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bench = [sys.executable, "-m", "benchmarks.quality"]
    proc = subprocess.run([*bench, "--quick", "--corpora", str(corpora), "--out", str(tmp_path),
                           "--row", "synergy-space", "--eval-bytes", "500"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "quality.json").read_text())
    figures = data["benchmarks"]["quality"]["figures"]
    assert figures["synergy-space/bpb_pydocs_valid"]["value"] > 0
    markdown = (tmp_path / "quality.md").read_text()
    assert "## quality" in markdown and "| 5b | synergy-space" in markdown  # the comparison table
    bad = subprocess.run([*bench, "--corpora", str(tmp_path / "none"), "--train-bytes", "4096"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "pass --corpora DIR" in bad.stderr


def _fake_result(name: str, number: str, bpb: float, bytes_per_concept: float, steps: int = 40) -> dict:
    """A row result with the fields the table and the plots read (values chosen, not measured)."""
    curve = [8.0 - 5.0 * i / steps for i in range(steps)]
    valid = {"bits_per_byte": bpb, "bytes_per_concept": bytes_per_concept, "concepts": 1000 / bytes_per_concept,
             "groups": {"library": {"bits_per_byte": bpb}}}
    return {"row": name, "number": number, "what": name, "params_total": 10, "params_active": 10,
            "train_bytes": 4096 * steps, "steps": steps, "batch_size": 8,
            "seq_len_units": 512 if name != "llama-bpe" else 128,
            "train_flops": 1e9, "train_bytes_per_s_cpu": 5000.0, "train_bytes_per_s_wall": 4000.0,
            "peak_rss_train_mib": 100.0, "rss_with_text_and_model_mib": 90.0, "peak_rss_mib": 120.0,
            "train_curve": curve,
            "eval": {"pydocs-valid": valid, "pystdlib-code-heldout": {"bits_per_byte": bpb + 0.1}}}


def test_table_from_combines_earlier_runs_into_one_report_with_plots(tmp_path):
    """Two runs that shared the machine: one report, the table in row order, goals judged, and plots
    whose drawn numbers are the results' own."""
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "a" / "quality", tmp_path / "b" / "quality"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    rows = {"synergy-cosine": ("1", 2.3, 3.4), "byte-transformer": ("6", 2.6, 1.0), "llama-bpe": ("7", 2.2, 3.9)}
    for name, (number, bpb, bpc) in rows.items():
        result = _fake_result(name, number, bpb, bpc)
        (a if name == "synergy-cosine" else b).joinpath(f"{name}.json").write_text(json.dumps(result))
    cfg = quality.QualityConfig(table_from=[str(a), str(b)], work_dir=str(tmp_path / "out" / "quality"))
    report = quality.run(cfg, "python -m benchmarks.quality --table-from a b")
    goals = {t.name: t for t in report.targets}
    assert goals["row 1 bits/byte on pydocs-valid below row 6 (byte-transformer)"].measured == pytest.approx(2.3 / 2.6)
    assert goals["row 1 bits/byte on pydocs-valid below row 7 (llama-bpe)"].status == "missed"
    assert goals["row 1 concepts / BPE tokens on pydocs-valid"].measured == pytest.approx(3.9 / 3.4)
    table = report.appendix.splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1", "6", "7"]
    order = list(quality.ROW_NAMES)
    from benchmarks import quality_plots

    drawn = quality_plots.plot_bits_per_byte(quality.load_results([str(a), str(b)]), order, tmp_path / "bars.png")
    assert drawn == {name: (bpb, pytest.approx(bpb + 0.1)) for name, (_, bpb, _) in rows.items()}
    results = quality.load_results([str(a), str(b)])
    curves = quality_plots.plot_training_curves(results, order, tmp_path / "curves.png")
    # byte rows: bits per byte as trained; the BPE row: bits per token / training bytes per token
    assert curves["synergy-cosine"][0] == pytest.approx(8.0)
    assert quality_plots.train_bytes_per_unit(results["llama-bpe"]) == 4.0  # 4096 bytes per step / (8 x 128 tokens)
    assert curves["llama-bpe"][0] == pytest.approx(8.0 / 4.0)
    for png in ("quality_bits_per_byte.png", "quality_training_curves.png", "quality_compression.png"):
        assert (tmp_path / "out" / "quality" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="--table-from: .* not found; pass the OUT/quality directories"):
        quality.QualityConfig(table_from=[str(tmp_path / "nowhere")]).validate()


@pytest.mark.skipif(not Path("/work/shared/corpora/pydocs-valid.jsonl.zst").is_file(),
                    reason="the shared corpora (/work/shared/corpora) are not on this machine")
def test_real_corpora_split_keeps_validation_out_of_training():
    cfg = quality.QualityConfig(corpora="/work/shared/corpora")
    train = set(quality.training_documents(cfg))
    sets = quality.evaluation_sets(cfg)
    assert not train & {t for _, t in sets["pydocs-valid"]}
    assert not train & {t for _, t in sets["pystdlib-code-heldout"]}
