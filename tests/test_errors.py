"""Every failure a user can cause is one clear line: data errors of the trainer (at start and mid-run,
every rank, exit status 65, the last checkpoint untouched), data.on_corrupt=skip, and bad inputs to
synergy-preprocess and synergy-data."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline import cli as data_cli
from data_pipeline import preprocess as prep
from data_pipeline.shards import TRAILER, CorruptShardError, ShardReader, make_manifest, save_manifest, write_shard
from data_pipeline.stream import StreamingByteDataset
from synergy_dist.config import config_from_dict
from synergy_dist.train.data import DataError, build_dataset, data_error
from synergy_dist.train.distributed import DATA_ERROR_EXIT_CODE
from tests import train_launch as tl
from tests.data_corpus_helpers import make_documents, write_jsonl

SEQ, BATCH = 64, 4  # the trainer tests' windows and global batch
N_SHARDS = 40


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """40 small shards (about 6 windows each), so that the first steps leave most shards unread."""
    root = tmp_path_factory.mktemp("errors") / "set"
    root.mkdir()
    docs = [d.encode() for d in make_documents(200, seed=3, min_len=40, max_len=150)]
    per = len(docs) // N_SHARDS
    infos = [write_shard(root / f"shard-{i:06d}.bin", docs[i * per:(i + 1) * per], frame_bytes=256)
             for i in range(N_SHARDS)]
    save_manifest(root, make_manifest(infos, source={"test": "errors"}))
    return root


def copy_set(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def flip_every_frame(path: Path) -> None:
    """One flipped byte in the middle of each frame, so that whichever frame a window reads is damaged."""
    reader = ShardReader(path)
    reader.load_index()
    frames = reader._frames.tolist()
    reader.close()
    for offset, size, _ in frames:
        flip(path, offset + size // 2)


def train_cfg(tmp_path: Path, source: Path, name: str = "run", **sections) -> dict:
    sections.setdefault("data", {})
    sections["data"] = {"sources": [str(source)], "valid_sources": [], "seq_len": SEQ, **sections["data"]}
    cfg = tl.tiny_config(tmp_path / name, tmp_path / "sample", **sections)
    cfg["train"]["eval_every_steps"] = 0
    return cfg


def shards_read_by_step(source: Path, steps: int) -> list[set[int]]:
    """The shards each global batch of the trainer's stream reads (the stream is the same on any world size)."""
    ds = StreamingByteDataset([source], seq_len=SEQ, global_batch_size=BATCH, micro_batch_size=1, seed=0)
    return [{s for n in range(step * BATCH, (step + 1) * BATCH) for s in ds.sources[0].shards_of(ds.window_id(n)[1])}
            for step in range(steps)]


# ----------------------------------------------------------------------------- data errors at start

def start_cfg(source: Path, on_corrupt: str = "error"):
    return config_from_dict({"data": {"sources": [str(source)], "seq_len": SEQ, "on_corrupt": on_corrupt},
                             "batch": {"global_batch_size": BATCH, "micro_batch_size": 1}})


def edit_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def without_checksum(change):
    """An edit that also drops the manifest's own checksum (as in manifests written before it existed)."""
    def edit(data):
        change(data)
        data.pop("manifest_sha256")
    return edit


@pytest.mark.parametrize("damage, message", [
    ("missing", r"^shard set {d}: directory not found \(run synergy-preprocess first\)$"),
    ("file", r"^shard set {d}: a file, not a shard-set directory \(pass the directory that holds manifest.json\)$"),
    ("unfinished", r"^shard set {d}: no manifest.json \(preprocessing did not finish; re-run the same "
                   r"synergy-preprocess command to complete it\)$"),
    ("sha256", r"^{d}/manifest.json: edited or damaged after it was written \(its checksum does not match\); restore "
               r"it, or re-create the set with synergy-preprocess; `synergy-data verify {d}` lists every problem$"),
    ("totals", r"^{d}/manifest.json: totals \(\d+ documents, 1 bytes\) disagree with the shard entries \(\d+, \d+\); "
               r"restore it, or re-create the set with synergy-preprocess; `synergy-data verify {d}` lists every "
               r"problem$"),
    ("version", r"^{d}/manifest.json: format version 2 is not supported \(this code reads version 1\); re-run "
                r"synergy-preprocess with this version$"),
    ("not_json", r"^{d}/manifest.json: not valid JSON \(.*\); re-create the set with synergy-preprocess$"),
])
def test_a_shard_set_that_cannot_be_read_is_one_line_naming_it_and_the_fix(shard_set, tmp_path, damage, message):
    d = tmp_path / "set"
    if damage == "file":
        d.write_text("not a directory")
    elif damage != "missing":
        copy_set(shard_set, d)
    if damage == "unfinished":
        (d / "manifest.json").unlink()
    elif damage == "sha256":  # an edit that keeps the manifest consistent: only its own checksum tells
        edit_manifest(d, lambda m: m["shards"][0].update(sha256="0" * 64))
    elif damage == "totals":
        edit_manifest(d, without_checksum(lambda m: m.update(total_bytes=1)))
    elif damage == "version":
        edit_manifest(d, lambda m: m.update(version=2))
    elif damage == "not_json":
        (d / "manifest.json").write_bytes(b"\xff\x00{")
    with pytest.raises(DataError) as caught:
        build_dataset(start_cfg(d), [str(d)], rank=0, world=1, global_batch=BATCH)
    text = str(caught.value)
    assert "\n" not in text
    assert re.match(message.format(d=d), text), text


def test_a_shard_of_another_format_version_or_in_place_of_a_directory_is_named_with_the_fix(shard_set, tmp_path):
    d = copy_set(shard_set, tmp_path / "set")
    shard = d / "shard-000000.bin"
    data = bytearray(shard.read_bytes())
    fields = list(TRAILER.unpack(bytes(data[-TRAILER.size:])))
    fields[4] = 2  # the version field (not covered by the index checksum, so checked on its own)
    data[-TRAILER.size:] = TRAILER.pack(*fields)
    shard.write_bytes(bytes(data))
    ds = build_dataset(start_cfg(d), [str(d)], rank=0, world=1, global_batch=BATCH)
    with pytest.raises(CorruptShardError) as caught:
        ds.sources[0].reader(0)
    assert str(caught.value) == (f"shard {shard}: format version 2, this code reads 1; re-create the set with this "
                                 "version's synergy-preprocess")
    other = d / "shard-000001.bin"
    other.unlink()
    other.mkdir()  # unreadable as a file (root reads any file whatever its mode, so a directory stands in)
    with pytest.raises(CorruptShardError, match=rf"^shard {other}: cannot be read \(Is a directory\); check the file"):
        ds.sources[0].reader(1)


def test_a_damaged_shard_read_by_a_dataloader_worker_is_still_one_line(shard_set, tmp_path):
    """DataLoader re-raises a worker's exception with the worker's traceback in its message: the
    trainer's line keeps the original message and adds the fix."""
    d = copy_set(shard_set, tmp_path / "set")
    for shard in d.glob("shard-*.bin"):
        flip_every_frame(shard)
    ds = build_dataset(start_cfg(d), [str(d)], rank=0, world=1, global_batch=BATCH)
    with pytest.raises(CorruptShardError) as caught:
        next(iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)))
    assert "Traceback" in str(caught.value)  # what DataLoader makes of it
    line = str(data_error(caught.value))
    assert re.fullmatch(rf"shard {d}/shard-\d{{6}}\.bin: frame \d+ fails its checksum or cannot be decompressed "
                        rf"\(.*\); run `synergy-data verify {d}` to list every problem and re-create the set with "
                        r"synergy-preprocess, or set data.on_corrupt=skip to train without the damaged shards", line)


# ----------------------------------------------------------------------------- the trainer, end to end

def two_rank_env(rank: int, port: int) -> dict:
    return dict(tl.child_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def test_a_corrupt_frame_mid_run_stops_every_rank_with_one_line_and_status_65(shard_set, tmp_path):
    """Two ranks (two processes started by hand, so each one's exit status and output are its own)."""
    steps = 6
    read = shards_read_by_step(shard_set, steps)
    # the first step that reads a shard no earlier step read: corrupt that shard, so steps before it succeed
    bad_step, bad_shard = next((k, min(read[k] - set().union(*read[:k]))) for k in range(3, steps)
                               if read[k] - set().union(*read[:k]))
    d = copy_set(shard_set, tmp_path / "set")
    shard = d / f"shard-{bad_shard:06d}.bin"
    flip_every_frame(shard)
    cfg = train_cfg(tmp_path, d, train={"max_steps": steps}, checkpoint={"every_steps": 2, "keep_last": 10})
    run_dir = Path(cfg["run"]["dir"])
    run_dir.mkdir(parents=True)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    port = tl.free_port()
    procs = [subprocess.Popen([str(tl.BIN / "synergy-train"), "--config", str(config_path)], cwd=str(tl.REPO),
                              env=two_rank_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    expected = rf"synergy-train: data error: shard {shard}: frame \d+ fails its checksum or cannot be decompressed \("
    fix = (f"; run `synergy-data verify {d}` to list every problem and re-create the set with synergy-preprocess, "
           "or set data.on_corrupt=skip to train without the damaged shards")
    for proc, (out, err) in zip(procs, outputs):
        err = err.decode()
        assert proc.returncode == DATA_ERROR_EXIT_CODE, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("synergy-train:")]
        assert len(lines) == 1 and re.match(expected, lines[0]) and lines[0].endswith(fix), err[-3000:]
        assert "Traceback" not in err + out.decode()
    # the steps before the bad one trained and were logged; the last checkpoint is the last complete one
    assert [r["step"] for r in tl.metrics(cfg)] == list(range(1, bad_step + 1))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step_{s:08d}" for s in range(2, bad_step + 1, 2)]
    assert all((run_dir / "checkpoints" / c / "COMPLETE").is_file() for c in checkpoints)


def test_on_corrupt_skip_trains_without_the_shard_and_counts_the_windows(shard_set, tmp_path):
    steps = 6
    read = shards_read_by_step(shard_set, steps)
    bad_shard = next(iter(read[1]))  # read by step 2
    d = copy_set(shard_set, tmp_path / "set")
    shard = d / f"shard-{bad_shard:06d}.bin"
    flip(shard, 20)
    cfg = train_cfg(tmp_path, d, data={"on_corrupt": "skip"}, train={"max_steps": steps},
                    checkpoint={"every_steps": 0})
    status = tl.run(cfg)
    output = tl.output_of(cfg)
    assert status == 0, output[-3000:]
    # which windows are replaced is a function of the files alone: every sample whose window reads the shard
    ds = StreamingByteDataset([shard_set], seq_len=SEQ, global_batch_size=BATCH, micro_batch_size=1, seed=0)
    touching = [n for n in range(steps * BATCH) if bad_shard in ds.sources[0].shards_of(ds.window_id(n)[1])]
    records = {r["step"]: r for r in tl.metrics(cfg)}
    assert [records[s]["data_skipped_windows"] for s in range(1, steps + 1)] == [
        sum(1 for n in touching if n < s * BATCH) for s in range(1, steps + 1)]
    assert touching and records[steps]["data_skipped_windows"] == len(touching)
    assert f"skipping corrupt shard {shard} (on_corrupt=skip: no window touching it is read): frame 0 fails" in output
    events = (Path(cfg["run"]["dir"]) / "events.log").read_text()
    assert "window(s) replaced: they touch corrupt shards" in events


def test_a_data_error_at_start_exits_65_with_one_line_and_a_traceback_only_with_synergy_debug(tmp_path):
    missing = tmp_path / "nowhere"
    cfg = train_cfg(tmp_path, missing, checkpoint={"every_steps": 0})
    status = tl.run(cfg)
    output = tl.output_of(cfg)
    assert status == DATA_ERROR_EXIT_CODE
    assert output.strip().splitlines()[-1] == (f"synergy-train: data error: shard set {missing}: directory not "
                                               "found (run synergy-preprocess first)")
    assert "Traceback" not in output
    config_path = tmp_path / "run.yaml"  # written by tl.run
    debug = subprocess.run([str(tl.BIN / "synergy-train"), "--config", str(config_path)], cwd=str(tl.REPO),
                           env=dict(tl.child_env(), SYNERGY_DEBUG="1"), capture_output=True, text=True, timeout=300)
    assert debug.returncode == DATA_ERROR_EXIT_CODE
    assert "Traceback" in debug.stderr and "DataError" in debug.stderr


# ----------------------------------------------------------------------------- synergy-preprocess and synergy-data

def preprocess_error(capsys, *args) -> tuple[int, str]:
    status = prep.main([*map(str, args), "--quiet"])
    return status, capsys.readouterr().err


def test_preprocess_bad_inputs_are_one_clear_line(tmp_path, capsys):
    binary = tmp_path / "image.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    status, err = preprocess_error(capsys, binary, "--output", tmp_path / "o1")
    assert status == 2 and err == (f"synergy-preprocess: error: {binary} line 1: not valid UTF-8 (byte 0 of the "
                                   "line); JSON Lines must be UTF-8 text (a binary or Latin-1 file? convert it, or "
                                   "pass raw bytes as .txt)\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    status, err = preprocess_error(capsys, latin1, "--output", tmp_path / "o2")
    assert status == 2 and err.startswith(f"synergy-preprocess: error: {latin1} line 2: not valid UTF-8")
    damaged = tmp_path / "damaged.jsonl.zst"
    damaged.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))
    status, err = preprocess_error(capsys, damaged, "--output", tmp_path / "o3")
    assert status == 2 and err.startswith(f"synergy-preprocess: error: {damaged}: cannot decompress (")
    assert err.endswith("the file is damaged or not .jsonl.zst\n") and err.count("\n") == 1
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    status, err = preprocess_error(capsys, empty, "--output", tmp_path / "o4")
    assert status == 2 and err.startswith("synergy-preprocess: error: empty corpus: 1 documents read")
    folder = tmp_path / "corpus.jsonl"
    folder.mkdir()
    status, err = preprocess_error(capsys, folder, "--output", tmp_path / "o5")
    assert status == 2 and err == (f"synergy-preprocess: error: input {folder} is a directory, not a .jsonl file; "
                                   "pass the file(s) inside it (e.g. a quoted glob 'DIR/*.jsonl')\n")


def test_preprocess_keeps_the_bytes_of_binary_and_invalid_utf8_text_files(tmp_path, capsys):
    """Policy: a .txt input is one document of its exact bytes, whatever they are."""
    blob = bytes(range(256)) + b"caf\xe9 \xff\xfe"
    (tmp_path / "blob.txt").write_bytes(blob)
    assert prep.main([str(tmp_path / "blob.txt"), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    from data_pipeline.shards import iter_shard_documents

    assert list(iter_shard_documents(tmp_path / "o")) == [blob]


def test_a_long_single_line_document_round_trips(tmp_path):
    """One 8 MiB JSON line (the memory policy for multi-GB lines is in docs/DATA.md): stored whole."""
    text = "x" * (8 << 20)
    write_jsonl(tmp_path / "long.jsonl", [text, "short"])
    prep.preprocess([str(tmp_path / "long.jsonl")], tmp_path / "o", progress=False)
    from data_pipeline.shards import iter_shard_documents, verify_shard_set

    assert [len(d) for d in iter_shard_documents(tmp_path / "o")] == [8 << 20, 5]
    assert verify_shard_set(tmp_path / "o") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_an_output_on_a_read_only_file_system_is_one_line(tmp_path, capsys, shard_set):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        write_jsonl(tmp_path / "a.jsonl", ["hello"])
        status, err = preprocess_error(capsys, tmp_path / "a.jsonl", "--output", ro / "out")
        assert status == 2 and err == (f"synergy-preprocess: error: cannot access {ro / 'out'}: Read-only file "
                                       "system; check that the inputs are readable and --output is on a writable "
                                       "file system with free space\n")
        assert data_cli.main(["merge", "--output", str(ro / "merged"), str(shard_set)]) == 1
        assert capsys.readouterr().err == f"synergy-data: error: cannot access {ro / 'merged'}: Read-only file system\n"
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_synergy_data_names_a_file_given_for_a_directory(tmp_path, capsys):
    path = tmp_path / "manifest.json"
    path.write_text("{}")
    assert data_cli.main(["info", str(path)]) == 1
    assert capsys.readouterr().err == (f"synergy-data: error: shard set {path}: a file, not a shard-set directory "
                                       "(pass the directory that holds manifest.json)\n")
    assert data_cli.main(["merge", "--output", str(path), str(tmp_path)]) == 1
    assert "synergy-data: error:" in capsys.readouterr().err


def test_verify_names_every_damage(shard_set, tmp_path, capsys):
    d = copy_set(shard_set, tmp_path / "set")
    flip(d / "shard-000003.bin", 20)
    (d / "shard-000005.bin").write_bytes((d / "shard-000005.bin").read_bytes()[:-7])
    assert data_cli.main(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL shard {d / 'shard-000003.bin'}: frame 0 fails its checksum" in out
    assert f"FAIL shard {d / 'shard-000005.bin'}: truncated or resized" in out
