"""Shard format: exact round trip, lazy frame access, and clear errors for corrupted/truncated shards."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.shards import (
    TRAILER,
    CorruptShardError,
    FrameCache,
    ManifestError,
    ShardReader,
    frame_key,
    iter_shard_documents,
    load_manifest,
    make_manifest,
    save_manifest,
    verify_shard_set,
    write_shard,
)


def _docs() -> list[bytes]:
    rng = np.random.default_rng(0)
    docs = [bytes(rng.integers(0, 256, size=int(n), dtype=np.uint8)) for n in rng.integers(0, 300, size=40)]
    docs[3] = b""  # empty documents keep their place
    return docs


@pytest.fixture
def shard_set(tmp_path):
    docs = _docs()
    infos = [
        write_shard(tmp_path / "shard-000000.bin", docs[:25], frame_bytes=256),
        write_shard(tmp_path / "shard-000001.bin", docs[25:], frame_bytes=256),
    ]
    save_manifest(tmp_path, make_manifest(infos, source={"test": True}))
    return tmp_path, docs


def test_round_trip_exact_bytes_and_ranges(shard_set):
    directory, docs = shard_set
    assert list(iter_shard_documents(directory)) == docs
    manifest = load_manifest(directory)
    assert manifest.total_documents == 40 and manifest.total_bytes == sum(map(len, docs))
    reader = ShardReader(directory / "shard-000000.bin")
    raw = b"".join(docs[:25])
    assert reader.raw_bytes == len(raw) and reader.n_frames == -(-len(raw) // 256)
    rng = np.random.default_rng(1)
    for _ in range(50):
        lo, hi = sorted(int(x) for x in rng.integers(0, len(raw) + 1, size=2))
        assert reader.read(lo, hi).tobytes() == raw[lo:hi]
    assert reader.doc_ends.tolist() == np.cumsum([len(d) for d in docs[:25]]).tolist()


def test_recycled_frame_buffers_never_leak_into_returned_bytes(shard_set):
    directory, docs = shard_set
    raw = b"".join(docs[:25])
    reader = ShardReader(directory / "shard-000000.bin", cache=FrameCache(1))  # evicts on every new frame
    rng = np.random.default_rng(2)
    kept = []
    for _ in range(60):
        lo, hi = sorted(int(x) for x in rng.integers(0, len(raw) + 1, size=2))
        kept.append((lo, hi, reader.read(lo, hi)))
    assert all(got.tobytes() == raw[lo:hi] for lo, hi, got in kept)


def test_reading_a_range_decompresses_only_the_frames_it_touches(shard_set):
    directory, docs = shard_set
    reader = ShardReader(directory / "shard-000000.bin")
    reader.read(300, 400)  # inside frame 1 (bytes 256..511)
    assert sorted(reader._cache._items) == [frame_key(reader.cache_id, 1)]
    reader.read(500, 520)  # frames 1 and 2
    assert sorted(reader._cache._items) == [frame_key(reader.cache_id, k) for k in (1, 2)]


def test_index_uses_64_bit_offsets(shard_set):
    directory, _ = shard_set
    data = (directory / "shard-000000.bin").read_bytes()
    index_offset, n_frames, n_docs, _, _, magic = TRAILER.unpack(data[-TRAILER.size :])
    assert magic == b"SYNIDX01" and n_docs == 25
    table = np.frombuffer(data, dtype="<u8", count=3 * n_frames, offset=index_offset).reshape(-1, 3)
    assert table.dtype.itemsize == 8 and table[0, 0] == 8  # first frame right after the 8-byte magic
    assert index_offset + 8 * (3 * n_frames + n_docs) + TRAILER.size == len(data)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_frame_is_reported_with_the_shard_name(shard_set):
    directory, _ = shard_set
    path = directory / "shard-000001.bin"
    _flip(path, 30)  # inside frame 0's compressed payload
    reader = ShardReader(path)
    with pytest.raises(CorruptShardError, match=r"shard .*shard-000001\.bin: frame 0 fails its checksum"):
        reader.read(0, 10)
    problems = verify_shard_set(directory)
    assert any("shard-000001.bin: sha256 mismatch" in p for p in problems)
    assert any("shard-000001.bin: frame 0 fails its checksum" in p for p in problems)
    assert not any("shard-000000.bin" in p for p in problems)


def test_flipped_byte_in_the_index_is_reported(shard_set):
    directory, _ = shard_set
    path = directory / "shard-000000.bin"
    index_offset = TRAILER.unpack(path.read_bytes()[-TRAILER.size :])[0]
    _flip(path, index_offset + 3)
    with pytest.raises(CorruptShardError, match=r"shard-000000\.bin: index checksum mismatch"):
        ShardReader(path).load_index()


def test_truncated_shard_is_reported(shard_set):
    directory, _ = shard_set
    path = directory / "shard-000000.bin"
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        CorruptShardError,
        match=rf"shard-000000\.bin: truncated or resized: {full - 100} bytes on disk, manifest says {full}",
    ):
        ShardReader(path, expected_bytes=full).load_index()
    with pytest.raises(CorruptShardError, match=r"shard-000000\.bin: bad trailer magic"):
        ShardReader(path).load_index()
    problems = verify_shard_set(directory)
    assert any(f"shard-000000.bin: truncated or resized: {full - 100} bytes on disk" in p for p in problems)


def test_missing_shard_and_missing_manifest(shard_set, tmp_path_factory):
    directory, _ = shard_set
    (directory / "shard-000001.bin").unlink()
    assert any("shard-000001.bin: file not found" in p for p in verify_shard_set(directory))
    empty = tmp_path_factory.mktemp("unfinished")
    with pytest.raises(
        ManifestError,
        match=r"no manifest.json \(preprocessing did not finish; re-run the same synergy-preprocess command",
    ):
        load_manifest(empty)
    with pytest.raises(ManifestError, match=r"directory not found"):
        load_manifest(empty / "nope")


def test_shard_written_atomically_leaves_no_temporary_files(shard_set):
    directory, _ = shard_set
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "shard-000000.bin", "shard-000001.bin"]
