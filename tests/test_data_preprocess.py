"""synergy-preprocess: every input kind, options, parallel = serial, resume after a real SIGKILL, errors."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from data_corpus_helpers import make_documents, write_jsonl

from data_pipeline.preprocess import PreprocessError, parse_size, preprocess
from data_pipeline.readers import InputError
from data_pipeline.shards import iter_shard_documents, load_manifest, verify_shard_set

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _bytes(docs):
    return [d.encode() for d in docs]


def test_every_local_input_kind_round_trips_in_order(tmp_path):
    docs = make_documents(60, seed=1)
    a, b, c, d = docs[:15], docs[15:30], docs[30:45], docs[45:59]
    write_jsonl(tmp_path / "a.jsonl", a)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in b)
    c_lines = "".join(json.dumps({"text": t}) + "\n" for t in c).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(c_lines))
    pq.write_table(pa.table({"text": d}), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_bytes(docs[59].encode())
    out = tmp_path / "out"
    inputs = [tmp_path / name for name in ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.txt"]]
    result = preprocess(inputs, out, shard_size=2000, frame_bytes=512, min_doc_bytes=0, progress=False)
    assert result == {"train": out}
    assert list(iter_shard_documents(out)) == _bytes(docs)
    manifest = load_manifest(out)
    assert len(manifest.shards) > 3 and manifest.total_documents == 60
    assert verify_shard_set(out) == []
    # a glob expands in sorted order: the same documents
    out2 = tmp_path / "out2"
    preprocess([str(tmp_path / "*.jsonl*")], out2, min_doc_bytes=0, progress=False)
    assert list(iter_shard_documents(out2)) == _bytes(a + b + c)  # a.jsonl, b.jsonl.gz, c.jsonl.zst


def test_hugging_face_datasets_path_streams(tmp_path):
    docs = make_documents(12, seed=2)
    (tmp_path / "hf").mkdir()
    write_jsonl(tmp_path / "hf" / "train.jsonl", docs, field="content")
    out = tmp_path / "out"
    preprocess([str(tmp_path / "hf")], out, text_field="content", min_doc_bytes=0, progress=False)
    assert list(iter_shard_documents(out)) == _bytes(docs)


def test_filters_limits_dedup_and_validation_split(tmp_path):
    docs = make_documents(300, seed=3)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    full = [d.encode() for d in docs]

    preprocess([src], tmp_path / "limit", max_docs=37, min_doc_bytes=0, progress=False)
    assert list(iter_shard_documents(tmp_path / "limit")) == full[:37]

    preprocess([src], tmp_path / "bytes", max_bytes=5000, min_doc_bytes=0, progress=False)
    kept = list(iter_shard_documents(tmp_path / "bytes"))
    assert sum(map(len, kept)) >= 5000 > sum(map(len, kept[:-1])) and kept == full[: len(kept)]

    preprocess([src], tmp_path / "min", min_doc_bytes=200, progress=False)
    assert list(iter_shard_documents(tmp_path / "min")) == [d for d in full if len(d) >= 200]

    preprocess([src], tmp_path / "dedup", dedup=True, min_doc_bytes=0, progress=False)
    unique = list(dict.fromkeys(full))
    assert len(unique) < len(full) and list(iter_shard_documents(tmp_path / "dedup")) == unique

    result = preprocess([src], tmp_path / "split", valid_fraction=0.2, seed=7, min_doc_bytes=0, progress=False)
    assert result == {"train": tmp_path / "split" / "train", "valid": tmp_path / "split" / "valid"}
    train, valid = list(iter_shard_documents(result["train"])), list(iter_shard_documents(result["valid"]))
    assert len(train) + len(valid) == len(full) and 30 <= len(valid) <= 90
    assert sorted(train + valid) == sorted(full) and not set(train) & set(valid)  # duplicates land together
    again = preprocess([src], tmp_path / "split2", valid_fraction=0.2, seed=7, min_doc_bytes=0, progress=False)
    assert list(iter_shard_documents(again["valid"])) == valid  # deterministic by document hash


def test_parallel_workers_write_the_same_shards_as_one(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", make_documents(200, seed=4))
    preprocess([src], tmp_path / "one", shard_size=3000, progress=False)
    preprocess([src], tmp_path / "two", shard_size=3000, workers=2, progress=False)
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert [(s.name, s.sha256) for s in one.shards] == [(s.name, s.sha256) for s in two.shards]
    assert len(one.shards) > 5


def _progress_files(out: Path) -> list[str]:
    progress = out / ".progress"
    return sorted(p.name for p in progress.glob("shard-*.json")) if progress.exists() else []


def test_resume_after_sigkill_neither_duplicates_nor_loses(tmp_path):
    """Kill the real process (SIGKILL) while it waits for more input, re-run, compare with a clean run."""
    docs = make_documents(400, seed=5, min_len=20)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    reference = tmp_path / "reference.jsonl"
    reference.write_bytes(lines)
    fifo = tmp_path / "corpus.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "data_pipeline.preprocess", str(fifo),
        "--output", str(out), "--shard-size", "4KiB", "--workers", "2",
    ]

    def feed(data: bytes, done: threading.Event | None) -> None:
        try:
            with open(fifo, "wb") as f:
                f.write(data)
                f.flush()
                if done is not None:
                    done.wait(60)
        except BrokenPipeError:
            pass

    release = threading.Event()
    feeder = threading.Thread(target=feed, args=(lines[: len(lines) // 2], release))
    feeder.start()
    proc = subprocess.Popen(command, env=ENV, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while len(_progress_files(out)) < 5 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes
    proc.wait()
    while time.time() < deadline:  # until every process of the group is gone (none holds the pipe)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    release.set()
    feeder.join()
    assert proc.returncode == -signal.SIGKILL
    written_before = _progress_files(out)
    assert len(written_before) >= 5 and not (out / "manifest.json").exists()

    feeder = threading.Thread(target=feed, args=(lines, None))
    feeder.start()
    rerun = subprocess.run(command, env=ENV, stderr=subprocess.PIPE, text=True, timeout=120)
    feeder.join()
    assert rerun.returncode == 0, rerun.stderr
    reused = int(rerun.stderr.split(" shards reused")[0].rsplit(" ", 1)[1])
    assert reused == len(written_before)  # every shard finished before the kill is kept, not rewritten

    preprocess([reference], tmp_path / "clean", shard_size="4KiB", progress=False)
    resumed, clean = load_manifest(out), load_manifest(tmp_path / "clean")

    def summary(manifest):
        return [(s.name, s.sha256, s.documents) for s in manifest.shards]

    assert summary(resumed) == summary(clean)
    assert list(iter_shard_documents(out)) == [d.encode() for d in docs]
    assert verify_shard_set(out) == []
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == ["manifest.json"]


def test_concurrent_runs_on_one_output_are_serialised(tmp_path):
    """Every rank preprocessing the same corpus on first use: one writes, the other finds it complete."""
    src = write_jsonl(tmp_path / "c.jsonl", make_documents(300, seed=10))
    command = [
        sys.executable, "-m", "data_pipeline.preprocess", str(src),
        "--output", str(tmp_path / "o"), "--shard-size", "2KiB",
    ]
    procs = [subprocess.Popen(command, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("is already complete" in o for o in outputs) == 1
    assert list(iter_shard_documents(tmp_path / "o")) == [d.encode() for d in make_documents(300, seed=10)]
    assert verify_shard_set(tmp_path / "o") == []


def test_rerun_of_a_complete_set_is_a_no_op(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", make_documents(30, seed=6))
    preprocess([src], tmp_path / "o", progress=False)
    before = (tmp_path / "o" / "manifest.json").stat().st_mtime_ns
    preprocess([src], tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "manifest.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "make_input, options, error, message",
    [
        (lambda t: [t / "missing.jsonl"], {}, InputError, r"input not found: .*missing\.jsonl \(check the path\)"),
        (lambda t: [str(t / "nothing-*.jsonl")], {}, InputError,
         r"input pattern .*nothing-\*\.jsonl' matches no files"),
        (lambda t: [write_jsonl(t / "f.jsonl", ["x"], field="body")], {}, InputError,
         r"f\.jsonl line 1: no field 'text' \(fields: body, id\); pass --text-field NAME"),
        (lambda t: [_write(t / "n.jsonl", '{"text": "ok"}\n{"text": 5}\n')], {}, InputError,
         r"n\.jsonl line 2: field 'text' holds int, not text \(pass --text-field"),
        (lambda t: [_write(t / "bad.jsonl", '{"text": "ok"}\n{not json\n')], {}, InputError,
         r"bad\.jsonl line 2: not valid JSON"),
        (lambda t: [write_jsonl(t / "short.jsonl", ["a", "bb"])], {"min_doc_bytes": 10}, PreprocessError,
         r"empty corpus: 2 documents read from .*short\.jsonl, none kept "
         r"\(2 shorter than --min-doc-bytes 10, 0 duplicates\)"),
        (lambda t: [_write(t / "x.csv", "a,b\n")], {}, InputError, r"input .*x\.csv: unknown file type"),
        (lambda t: [write_jsonl(t / "ok.jsonl", ["a"])], {"valid_fraction": 1.5}, PreprocessError,
         r"--valid-fraction must be in \[0, 1\), got 1\.5"),
        (lambda t: [write_jsonl(t / "ok.jsonl", ["a"])], {"shard_size": "12 parsecs"}, PreprocessError,
         r"cannot read size '12 parsecs'"),
        (lambda t: [write_jsonl(t / "ok.jsonl", ["a"])], {"max_docs": 0}, PreprocessError,
         r"--max-docs must be at least 1, got 0"),
        (lambda t: [write_jsonl(t / "ok.jsonl", ["a"])], {"colour": "red"}, PreprocessError,
         r"unknown preprocess option\(s\): colour"),
    ],
)
def test_bad_input_errors_name_the_problem(tmp_path, make_input, options, error, message):
    with pytest.raises(error, match=message):
        preprocess(make_input(tmp_path), tmp_path / "out", progress=False, **options)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_output_holding_a_different_shard_set_is_refused(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_documents(10, seed=8))
    b = write_jsonl(tmp_path / "b.jsonl", make_documents(10, seed=9))
    preprocess([a], tmp_path / "out", progress=False)
    with pytest.raises(
        PreprocessError,
        match=r"output .*out already holds a different shard set \(made from .*a\.jsonl.*\); choose another --output",
    ):
        preprocess([b], tmp_path / "out", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(
        PreprocessError, match=r"output .*other is not empty and holds no synergy shard set \(notes\.txt"
    ):
        preprocess([a], tmp_path / "other", progress=False)


def test_a_failed_first_attempt_does_not_block_the_corrected_command(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", make_documents(20, seed=13), field="body")
    with pytest.raises(InputError, match="no field 'text'"):
        preprocess([src], tmp_path / "o", progress=False)
    preprocess([src], tmp_path / "o", text_field="body", progress=False)
    assert list(iter_shard_documents(tmp_path / "o")) == [d.encode() for d in make_documents(20, seed=13)]


def test_an_unfinished_run_with_other_options_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", make_documents(200, seed=14))
    preprocess([src], tmp_path / "o", shard_size=2000, progress=False)
    (tmp_path / "o" / "manifest.json").unlink()  # as if killed before the manifest was written
    (tmp_path / "o" / ".progress").mkdir()
    (tmp_path / "o" / ".progress" / "plan.json").write_text(json.dumps({"inputs": ["other.jsonl"]}))
    with pytest.raises(
        PreprocessError, match=r"holds an unfinished run with different inputs or options \(inputs \['other.jsonl'\]\)"
    ):
        preprocess([src], tmp_path / "o", shard_size=2000, progress=False)


def test_cli_reports_errors_with_exit_status_2(tmp_path):
    run = subprocess.run(
        [
            sys.executable, "-m", "data_pipeline.preprocess", str(tmp_path / "nope.jsonl"),
            "--output", str(tmp_path / "o"),
        ],
        env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert "synergy-preprocess: error: input not found:" in run.stderr and "nope.jsonl" in run.stderr


def test_parse_size():
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("1GB") == 10**9
    assert parse_size("4096") == 4096
    assert parse_size("2k") == 2000
