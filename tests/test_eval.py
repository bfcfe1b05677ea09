"""synergy-eval and synergy_dist.evaluate: every byte counted once, bits per byte equal to the model's own
cross entropy on the same bytes, boundary and MoE statistics that agree with the model's aux, a
checkpoint of a 2-rank expert-parallel run that evaluates exactly like its export, and the trainer's
validation bits per byte equal to synergy-eval's on the same checkpoint (1 rank dense, 2 ranks MoE)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import eval_helpers as eh
import numpy as np
import pytest
import torch
import train_launch as tl
from model_configs import tiny_test_config

from data_pipeline.vocab import EOD_ID, IGNORE_INDEX, PAD_ID
from synergy_dist.eval_checkpoint import evaluate_checkpoint
from synergy_dist.evaluate import evaluate, evaluate_documents, evaluate_share, windows
from synergy_dist.model.synergy import SynergyLM

DOCS = [b"The quick brown fox jumps over the lazy dog.", b"a", b"caf\xc3\xa9 au lait " * 7, b"x" * 31]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return eh.trained_run(tmp_path_factory.getbasetemp() / "eval_run")


@pytest.fixture(scope="module")
def tiny_model() -> SynergyLM:
    torch.manual_seed(0)
    return SynergyLM(tiny_test_config()).eval()


@pytest.mark.parametrize("seq_len", [1, 7, 16, 45, 200])
def test_windows_predict_every_byte_exactly_once(seq_len):
    stream = [EOD_ID]
    for doc in DOCS:
        stream += [*doc, EOD_ID]
    rows = list(windows(DOCS, seq_len))
    assert all(len(r) == seq_len + 1 for r in rows)
    targets = [int(t) for r in rows for t in r[1:] if t != PAD_ID]
    assert targets == stream[1:]  # in order, none twice, none missing
    for previous, current in zip(rows, rows[1:]):
        assert previous[-1] == current[0]  # each window continues the last one's final id
    assert [int(t) for t in rows[-1] if t == PAD_ID] == [PAD_ID] * (len(rows) * seq_len + 1 - len(stream))


def test_bpb_equals_the_models_cross_entropy_on_the_same_bytes(tiny_model):
    seq_len = 16
    tally = evaluate_documents(tiny_model, DOCS, seq_len=seq_len, batch_size=3)
    # the same windows, built by hand: the stream cut every seq_len ids, the tail padded
    stream = [EOD_ID]
    for doc in DOCS:
        stream += [*doc, EOD_ID]
    n = math.ceil((len(stream) - 1) / seq_len)
    padded = stream + [PAD_ID] * (n * seq_len + 1 - len(stream))
    ids = torch.tensor([padded[k * seq_len:k * seq_len + seq_len + 1] for k in range(n)])
    labels = ids[:, 1:].clone()
    labels[labels >= 256] = IGNORE_INDEX  # EOD and PAD are not bytes of the data
    out = tiny_model(ids[:, :-1], labels=labels)
    assert tally.bytes == sum(len(d) for d in DOCS) == int((labels != IGNORE_INDEX).sum())
    assert tally.documents == len(DOCS) and tally.windows == n
    assert tally.summary()["bpb"] == pytest.approx(float(out.stats.ce_loss) / math.log(2), rel=1e-5)
    # the realised compression equals the model's own statistic on those windows
    units = int((ids[:, :-1] != PAD_ID).sum())
    concepts = round(float(out.stats.stages[0].boundary_rate) * units)
    stage = tally.summary()["stages"][0]
    assert (stage["units"], stage["concepts"]) == (units, concepts)
    assert stage["bytes_per_concept"] == pytest.approx(float(out.stats.stages[0].bytes_per_concept), rel=1e-5)
    assert sum(stage["prob_histogram"]) == units
    assert stage["concept_length"]["mean"] == pytest.approx(units / concepts)


def test_batch_size_does_not_change_the_result(tiny_model):
    one = evaluate_documents(tiny_model, DOCS, seq_len=12, batch_size=1).summary()
    many = evaluate_documents(tiny_model, DOCS, seq_len=12, batch_size=64).summary()
    assert one["bpb"] == pytest.approx(many["bpb"], rel=1e-5)
    for a, b in zip(one["stages"], many["stages"]):
        assert a["mean_prob"] == pytest.approx(b["mean_prob"], rel=1e-5)
        for key in ("units", "concepts", "prob_histogram", "concept_length"):
            assert a[key] == b[key], key


def test_evaluate_reports_each_source_and_their_sum(tiny_model, tmp_path):
    from data_pipeline.preprocess import preprocess

    for name, docs in (("a", DOCS[:2]), ("b", DOCS[2:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in docs))
        preprocess([str(tmp_path / f"{name}.jsonl")], tmp_path / name, progress=False)
    result = evaluate(tiny_model, {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, seq_len=10, batch_size=2)
    a, b, overall = result["sources"]["a"], result["sources"]["b"], result["overall"]
    assert a == evaluate_documents(tiny_model, DOCS[:2], 10, 2).summary()  # a source is evaluated on its own
    assert (a["bytes"], b["bytes"]) == (sum(map(len, DOCS[:2])), sum(map(len, DOCS[2:])))
    assert overall["bytes"] == a["bytes"] + b["bytes"] and overall["documents"] == 4
    bits = a["bpb"] * a["bytes"] + b["bpb"] * b["bytes"]
    assert overall["bpb"] == pytest.approx(bits / overall["bytes"], rel=1e-9)
    assert overall["stages"][0]["concepts"] == a["stages"][0]["concepts"] + b["stages"][0]["concepts"]


def test_two_rank_checkpoint_evaluates_like_its_export(run, tmp_path):
    run_dir = Path(run["run"]["dir"])
    valid = str(Path(run["data"]["sample_dir"]) / "valid")
    export_dir = eh.exported(run)
    results = {}
    for name, source in (("checkpoint", run_dir), ("export", export_dir)):
        done = eh.cli("synergy-eval", "--checkpoint", str(source), "--data", valid,
                      "--json", str(tmp_path / f"{name}.json"))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "bytes/concept" in done.stdout and "middle.0" in done.stdout  # the readable table
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    ckpt, exp = results["checkpoint"]["overall"], results["export"]["overall"]
    assert ckpt["bpb"] == pytest.approx(exp["bpb"], rel=1e-6)
    assert ckpt["stages"] == exp["stages"]
    assert results["checkpoint"]["checkpoint"].endswith(f"step_{eh.STEPS:08d}")
    assert results["checkpoint"]["seq_len"] == run["data"]["seq_len"]  # the training seq_len by default
    # every validation byte counted, the trained model better than uniform over 256 bytes
    from data_pipeline.shards import load_manifest

    assert ckpt["bytes"] == load_manifest(valid).total_bytes
    assert 0 < ckpt["bpb"] < 8
    # MoE: each concept token reaches top_k experts of each middle layer, none dropped (dropless)
    top_k = run["model"]["middle"]["moe"]["top_k"]
    assert set(ckpt["moe"]) == {"middle.0", "middle.1"}
    for layer in ckpt["moe"].values():
        assert sum(layer["tokens_per_expert"]) == top_k * ckpt["stages"][0]["concepts"]
        assert sum(layer["load_share"]) == pytest.approx(1.0)
        assert 0 < layer["load_entropy"] <= layer["load_entropy_max"] + 1e-9
        assert layer["dropped_fraction"] == 0.0


def validation_bpb(cfg: dict, step: int) -> float:
    [record] = [r for r in tl.metrics(cfg) if r["step"] == step]
    return record["eval_bpb"]


def test_two_rank_training_validation_equals_synergy_eval(run):
    """The 2-rank expert-parallel MoE run validates on the whole validation set at its last step, before the
    checkpoint of that step: synergy-eval on that checkpoint gives the same bits per byte."""
    valid = str(Path(run["data"]["sample_dir"]) / "valid")
    result = evaluate_checkpoint(run["run"]["dir"], [valid])
    assert validation_bpb(run, eh.STEPS) == pytest.approx(result["overall"]["bpb"], abs=1e-4)


def test_one_rank_training_validation_equals_synergy_eval(run, tmp_path):
    cfg = tl.tiny_config(tmp_path / "dense", Path(run["data"]["sample_dir"]),
                         train={"max_steps": 2, "lr": 3e-3, "sample_bytes": 0, "eval_every_steps": 2,
                                "eval_batches": 0}, batch={"global_batch_size": 2, "micro_batch_size": 2})
    assert tl.run(cfg) == 0, tl.output_of(cfg)[-4000:]
    valid = str(Path(run["data"]["sample_dir"]) / "valid")
    result = evaluate_checkpoint(cfg["run"]["dir"], [valid], batch_size=5)  # other batches: same windows
    assert validation_bpb(cfg, 2) == pytest.approx(result["overall"]["bpb"], abs=1e-4)


@pytest.mark.parametrize("world,max_batches", [(1, 0), (2, 0), (3, 0), (2, 2), (5, 1)])
def test_rank_shares_add_up_to_the_whole_evaluation(tiny_model, tmp_path, world, max_batches):
    from data_pipeline.preprocess import preprocess

    for name, docs in (("a", DOCS[:3]), ("b", DOCS[3:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in docs))
        preprocess([str(tmp_path / f"{name}.jsonl")], tmp_path / name, progress=False)
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    calls: list[int] = []
    hook = tiny_model.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        shares, forward_calls = [], []
        for rank in range(world):
            calls.clear()
            shares.append(evaluate_share(tiny_model, sources, seq_len=10, batch_size=2, rank=rank, world=world,
                                         max_batches=max_batches))
            forward_calls.append(len(calls))
    finally:
        hook.remove()
    assert len(set(forward_calls)) == 1  # every rank the same number of forward calls
    whole = evaluate(tiny_model, dict(zip("ab", sources)), seq_len=10, batch_size=2)["overall"]
    nats, n_bytes = sum(s.nats for s in shares), sum(s.bytes for s in shares)
    if max_batches == 0:
        assert n_bytes == whole["bytes"]
        assert nats / n_bytes / math.log(2) == pytest.approx(whole["bpb"], rel=1e-6)
    else:
        assert 0 < n_bytes < whole["bytes"]
        assert forward_calls[0] == max_batches


def test_raw_files_are_preprocessed_and_named_per_source(run, tmp_path):
    from synergy_dist.loading import load_model

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in DOCS[:3]))
    (tmp_path / "notes.txt").write_bytes(DOCS[3])
    out = tmp_path / "eval.json"
    done = eh.cli("synergy-eval", "--checkpoint", run["run"]["dir"], "--data", str(tmp_path / "docs.jsonl"),
                  str(tmp_path / "notes.txt"), "--seq-len", "32", "--batch-size", "3", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["sources"]) == ["docs.jsonl", "notes.txt"]
    model, _, _ = load_model(run["run"]["dir"])
    for name, docs in (("docs.jsonl", DOCS[:3]), ("notes.txt", DOCS[3:])):
        direct = evaluate_documents(model, docs, seq_len=32, batch_size=3).summary()
        assert result["sources"][name]["bpb"] == pytest.approx(direct["bpb"], rel=1e-6)
        assert result["sources"][name]["documents"] == len(docs)


def test_bad_paths_fail_with_a_clear_message(run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "split" / "valid").mkdir(parents=True)
    (tmp_path / "split" / "valid" / "manifest.json").write_text("{}")
    (tmp_path / "data.csv").write_text("a,b\n")
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere"), "--data", str(tmp_path)], "does not exist; pass a run directory"),
        (["--checkpoint", str(tmp_path / "empty"), "--data", str(tmp_path)], "or a synergy-export directory"),
        (["--checkpoint", run["run"]["dir"], "--data", str(tmp_path / "empty")],
         "is a directory without manifest.json"),
        (["--checkpoint", run["run"]["dir"], "--data", str(tmp_path / "split")],
         f"holds a train/valid split, not one shard set; pass {tmp_path / 'split' / 'valid'}"),
        (["--checkpoint", run["run"]["dir"], "--data", str(tmp_path / "data.csv")], "unknown file type"),
        (["--checkpoint", run["run"]["dir"], "--data", str(tmp_path / "gone.jsonl")], "gone.jsonl does not exist"),
    ]
    from synergy_dist.cli.eval import main

    for argv, message in cases:
        status, err = _run_main(main, argv)
        assert status == 2 and message in err, (argv, err)


def _run_main(main, argv) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, err.getvalue()


def test_uniform_model_scores_log2_vocab_bits_per_byte():
    """A model whose logits are all equal scores log2(258) bits on every byte (the 258 ids: bytes, EOD, PAD)."""
    torch.manual_seed(0)
    model = SynergyLM(tiny_test_config()).eval()
    with torch.no_grad():
        model.head.weight.zero_()
    result = evaluate_documents(model, DOCS, seq_len=8, batch_size=2).summary()
    assert result["bpb"] == pytest.approx(np.log2(258), rel=1e-6)


def test_two_stage_statistics_agree_with_the_model():
    from model_configs import two_stage_config

    torch.manual_seed(1)
    model = SynergyLM(two_stage_config()).eval()
    seq_len = 40
    stages = evaluate_documents(model, DOCS, seq_len=seq_len, batch_size=16).summary()["stages"]
    assert len(stages) == 2
    ids = torch.from_numpy(np.stack(list(windows(DOCS, seq_len))))[:, :-1]
    stats = model(ids).stats  # one batch holds every window
    units0 = int((ids != PAD_ID).sum())
    concepts0 = round(float(stats.stages[0].boundary_rate) * units0)
    concepts1 = round(float(stats.stages[1].boundary_rate) * concepts0)
    assert (stages[0]["units"], stages[0]["concepts"]) == (units0, concepts0)
    assert (stages[1]["units"], stages[1]["concepts"]) == (concepts0, concepts1)  # stage 1 reads stage 0's concepts
    assert stages[1]["bytes_per_concept"] == pytest.approx(float(stats.stages[1].bytes_per_concept), rel=1e-5)
    assert stages[1]["compression"] == pytest.approx(float(stats.stages[1].compression), rel=1e-5)


def test_byte_level_model_has_no_concepts():
    from model_configs import byte_transformer_config

    from synergy_dist.evaluate import route_text

    torch.manual_seed(0)
    model = SynergyLM(byte_transformer_config(d_model=32, depth=1, n_heads=2)).eval()
    summary = evaluate_documents(model, DOCS, seq_len=16, batch_size=4).summary()
    assert summary["stages"] == [] and summary["bytes_per_concept"] == 1.0
    assert summary["bytes"] == sum(map(len, DOCS))
    with pytest.raises(ValueError, match="no router .a plain byte-level model.: there are no concept boundaries"):
        route_text(model, b"abc")


def test_concept_lengths_by_hand():
    from synergy_dist.evaluate import concept_lengths, length_summary

    boundary = torch.tensor([[1, 0, 0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    counts = concept_lengths(boundary, valid)  # row 0: 3, 1, 4; row 1: 1, 3 (padding not counted)
    assert counts.tolist()[:5] == [0, 2, 0, 2, 1] and counts.sum() == 5
    assert length_summary(counts) == {"mean": 12 / 5, "median": 3, "p90": 4, "max": 4}
    assert length_summary(np.zeros(3, np.int64)) == {"mean": 0.0, "median": 0, "p90": 0, "max": 0}
