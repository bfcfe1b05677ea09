"""synergy-data verify / info / merge, through the real console entry point."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from data_corpus_helpers import make_documents, write_jsonl

from data_pipeline.cli import main
from data_pipeline.preprocess import preprocess
from data_pipeline.shards import iter_shard_documents, load_manifest, verify_shard_set
from data_pipeline.stream import StreamingByteDataset


@pytest.fixture
def two_sets(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_documents(80, seed=21))
    b = write_jsonl(tmp_path / "b.jsonl", make_documents(50, seed=22))
    preprocess([a], tmp_path / "A", shard_size=4000, progress=False)
    preprocess([b], tmp_path / "B", shard_size=4000, progress=False)
    return tmp_path, a, b


def test_info_and_verify_report_a_sound_set(two_sets, capsys):
    root, _, _ = two_sets
    manifest = load_manifest(root / "A")
    assert main(["info", str(root / "A")]) == 0
    out = capsys.readouterr().out
    assert f"documents:   {manifest.total_documents}" in out and f"shards:      {len(manifest.shards)}" in out
    assert main(["verify", str(root / "A")]) == 0
    expected = f"OK {root / 'A'}: {len(manifest.shards)} shards, {manifest.total_documents} documents"
    assert expected in capsys.readouterr().out


def test_verify_fails_naming_the_corrupted_shard(two_sets):
    root, _, _ = two_sets
    shard = root / "A" / "shard-000002.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    run = subprocess.run(
        [sys.executable, "-m", "data_pipeline.cli", "verify", str(root / "A")],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1
    assert f"FAIL shard {shard}: sha256 mismatch" in run.stdout
    problems = verify_shard_set(root / "A")
    assert len(problems) == 2 and f"shard {shard}: sha256 mismatch" in problems[0]  # and the broken frame/index
    assert run.stdout.splitlines() == [f"FAIL {p}" for p in problems]
    assert f"{root / 'A'}: 2 problem(s)" in run.stderr


def test_verify_and_info_on_a_missing_set_exit_nonzero(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 1
    assert "directory not found" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert "directory not found (run synergy-preprocess first)" in capsys.readouterr().err


def test_merge_equals_a_single_preprocess_of_all_inputs(two_sets):
    root, a, b = two_sets
    assert main(["merge", "--output", str(root / "M"), str(root / "A"), str(root / "B")]) == 0
    preprocess([a, b], root / "single", shard_size=4000, progress=False)
    assert verify_shard_set(root / "M") == []
    merged, single = load_manifest(root / "M"), load_manifest(root / "single")
    assert merged.total_documents == single.total_documents and merged.total_bytes == single.total_bytes
    assert list(iter_shard_documents(root / "M")) == list(iter_shard_documents(root / "single"))
    assert len(merged.shards) == len(load_manifest(root / "A").shards) + len(load_manifest(root / "B").shards)

    def stream(directory):
        ds = StreamingByteDataset([directory], seq_len=64, global_batch_size=4, micro_batch_size=2, shuffle=False)
        return ds.epoch_size(), list(itertools.islice(iter(ds), ds.epoch_size()))

    (n_m, from_merged), (n_s, from_single) = stream(root / "M"), stream(root / "single")
    assert n_m == n_s
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(from_merged, from_single))
    # the union streams with a shuffle too: every window once per epoch
    ds = StreamingByteDataset(
        [root / "M"], seq_len=64, global_batch_size=4, micro_batch_size=2, shuffle_block=4, shuffle_window=16
    )
    assert sorted(ds.window_id(i)[1] for i in range(n_m)) == list(range(n_m))


def test_merge_refuses_bad_sources_and_a_non_empty_output(two_sets, capsys):
    root, _, _ = two_sets
    assert main(["merge", "--output", str(root / "M"), str(root / "A"), str(root / "missing")]) == 1
    assert "missing: directory not found" in capsys.readouterr().err
    (root / "A" / "shard-000001.bin").write_bytes(b"short")
    assert main(["merge", "--output", str(root / "M2"), str(root / "A")]) == 1
    assert "shard-000001.bin is missing or its size differs" in capsys.readouterr().err
    assert main(["merge", "--output", str(root / "A"), str(root / "B")]) == 1
    assert "is not empty; choose a new directory" in capsys.readouterr().err
