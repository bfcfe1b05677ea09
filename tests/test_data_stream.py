"""StreamingByteDataset: round trip, exact and elastic resume, ranks x workers, mixing, corruption, errors."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from data_corpus_helpers import make_documents, token_stream, write_jsonl

from data_pipeline.preprocess import preprocess
from data_pipeline.shards import CorruptShardError, ManifestError, ShardReader, frame_key, iter_shard_documents
from data_pipeline.stream import StreamingByteDataset
from data_pipeline.vocab import EOD_ID, IGNORE_INDEX, PAD_ID

L = 32  # seq_len of most tests
SMALL = dict(shuffle_block=8, shuffle_window=32)  # exercise both shuffle levels on small sets


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    a = write_jsonl(root / "a.jsonl", make_documents(150, seed=11, max_len=300))
    b = write_jsonl(root / "b.jsonl", make_documents(20, seed=12, max_len=120))
    preprocess([a], root / "A", shard_size=3000, frame_bytes=700, min_doc_bytes=0, progress=False)
    preprocess([b], root / "B", shard_size=1000, frame_bytes=300, min_doc_bytes=0, progress=False)
    return root / "A", root / "B"


def take(ds, n):
    return list(itertools.islice(iter(ds), n))


def ids(samples):
    return [int(s["sample_index"]) for s in samples]


def same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert int(x["sample_index"]) == int(y["sample_index"]) and int(x["source_id"]) == int(y["source_id"])
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_packed_stream_reproduces_the_corpus_exactly(corpora):
    A, _ = corpora
    stream = token_stream(list(iter_shard_documents(A)))
    ds = StreamingByteDataset([A], seq_len=L, global_batch_size=4, micro_batch_size=2, shuffle=False)
    n = ds.epoch_size()
    assert n == (len(stream) - 1) // L
    samples = take(ds, n)
    assert ids(samples) == list(range(n))
    for i, s in enumerate(samples):
        assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (L,)
        assert torch.equal(s["input_ids"], torch.from_numpy(stream[i * L : i * L + L]))
        assert torch.equal(s["labels"], torch.from_numpy(stream[i * L + 1 : i * L + L + 1]))
    delivered = np.concatenate([s["input_ids"].numpy() for s in samples] + [samples[-1]["labels"].numpy()[-1:]])
    assert np.array_equal(delivered, stream[: len(delivered)]) and len(stream) - len(delivered) < L


def test_shuffled_epochs_are_permutations_of_the_same_windows_and_differ(corpora):
    A, _ = corpora
    plain = StreamingByteDataset([A], seq_len=L, global_batch_size=4, micro_batch_size=2, shuffle=False)
    n = plain.epoch_size()
    content = {int(s["sample_index"]): s["input_ids"] for s in take(plain, n)}
    ds = StreamingByteDataset([A], seq_len=L, global_batch_size=4, micro_batch_size=2, seed=3, **SMALL)
    two_epochs = take(ds, 2 * n)
    windows = [ds.window_id(i)[1] for i in range(2 * n)]
    assert sorted(windows[:n]) == list(range(n)) and sorted(windows[n:]) == list(range(n))
    assert windows[:n] != windows[n:] and windows[:n] != list(range(n))
    for i, s in enumerate(two_epochs):
        assert torch.equal(s["input_ids"], content[windows[i]])
    other_seed = StreamingByteDataset([A], seq_len=L, global_batch_size=4, micro_batch_size=2, seed=4, **SMALL)
    assert [other_seed.window_id(i)[1] for i in range(n)] != windows[:n]
    # the level-2 groups keep reads local: 32 consecutive positions use at most 32/8 + 1 blocks
    blocks = {w // 8 for w in windows[:32]}
    assert len(blocks) <= 5


def test_one_document_per_window_pads_and_masks(corpora):
    _, B = corpora
    docs = list(iter_shard_documents(B))
    seq = 64
    ds = StreamingByteDataset([B], seq_len=seq, global_batch_size=4, micro_batch_size=2, pack=False, shuffle=False)
    assert ds.epoch_size() == len(docs)
    for s, doc in zip(take(ds, len(docs)), docs):
        window = list(doc[: seq + 1]) + ([EOD_ID] if len(doc) < seq + 1 else [])
        real = len(window)
        window += [PAD_ID] * (seq + 1 - real)
        assert s["input_ids"].tolist() == window[:-1]
        expected_labels = [t if j + 1 < real else IGNORE_INDEX for j, t in enumerate(window[1:])]
        assert s["labels"].tolist() == expected_labels
    assert any(len(d) > seq + 1 for d in docs) and any(len(d) < seq for d in docs)


def test_exact_resume_at_arbitrary_points(corpora):
    _, B = corpora

    def make():
        return StreamingByteDataset([B], seq_len=L, global_batch_size=6, micro_batch_size=3, seed=1, **SMALL)

    reference = take(make(), 140)
    n_epoch = make().epoch_size()
    assert n_epoch < 100  # the checks below cross an epoch boundary
    for n in [0, 1, 5, n_epoch - 1, n_epoch, n_epoch + 1, 97]:
        # from the state a consuming iterator reports
        ds = make()
        it = iter(ds)
        consumed = list(itertools.islice(it, n))
        state = ds.state_dict()
        assert state == ds.state_at(n) and state["samples"] == n and state["epoch"] == n // n_epoch
        same(consumed, reference[:n])
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        same(take(resumed, 20), reference[n : n + 20])


def test_state_at_is_pure(corpora):
    _, B = corpora
    ds = StreamingByteDataset([B], seq_len=L, global_batch_size=6, micro_batch_size=3)
    first = take(ds, 2)
    ds.state_at(50)
    after = take(ds, 2)  # a fresh iter() continues where the last one stopped
    assert ids(first) == [0, 1] and ids(after) == [2, 3]


def _run_ranks(source, world_size, steps, start_state=None, G=12, M=2):
    samples = []
    for rank in range(world_size):
        ds = StreamingByteDataset(
            [source], seq_len=L, global_batch_size=G, micro_batch_size=M, rank=rank, world_size=world_size, seed=5,
            **SMALL,
        )
        if start_state is not None:
            ds.load_state_dict(start_state)
        samples += take(ds, steps * G // world_size)
    return sorted(samples, key=lambda s: int(s["sample_index"]))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 3), (3, 2)])
def test_elastic_resume_continues_the_same_global_stream(corpora, before, after):
    A, _ = corpora
    G = 12
    reference = _run_ranks(A, 1, 8)
    first = _run_ranks(A, before, 3)
    ds = StreamingByteDataset([A], seq_len=L, global_batch_size=G, micro_batch_size=2, seed=5, **SMALL)
    second = _run_ranks(A, after, 5, start_state=ds.state_at(3 * G))
    same(first + second, reference)
    # rank r's share of global batch k is [k*G + r*G/W, k*G + (r+1)*G/W)
    r1 = StreamingByteDataset(
        [A], seq_len=L, global_batch_size=G, micro_batch_size=2, rank=1, world_size=3, seed=5, **SMALL
    )
    assert ids(take(r1, 8)) == [4, 5, 6, 7, 16, 17, 18, 19]


def _rank_main(rank, world_size, source, out, max_samples):
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world_size)
    ds = StreamingByteDataset(
        [source], seq_len=L, global_batch_size=8, micro_batch_size=2, rank=rank, world_size=world_size, seed=9,
        max_samples=max_samples, **SMALL,
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = []
    for batch in loader:
        got += [
            (int(i), ds.window_id(int(i))[1], batch["input_ids"][j].tolist())
            for j, i in enumerate(batch["sample_index"])
        ]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, got)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_times_workers_cover_one_epoch_exactly_once(corpora, tmp_path):
    """2 real rank processes (gloo), each with a DataLoader of 2 real worker processes."""
    A, _ = corpora
    single = StreamingByteDataset([A], seq_len=L, global_batch_size=8, micro_batch_size=2, seed=9, **SMALL)
    n = single.epoch_size()
    out = tmp_path / "gathered.json"
    mp.spawn(_rank_main, args=(2, str(A), str(out), n), nprocs=2, join=True)
    per_rank = json.loads(out.read_text())
    indices = sorted(i for rank in per_rank for i, _, _ in rank)
    assert indices == list(range(n))  # no duplicates, no gaps
    assert sorted(w for rank in per_rank for _, w, _ in rank) == list(range(n))  # every window once
    expected = {int(s["sample_index"]): s["input_ids"].tolist() for s in take(single, n)}
    for rank, got in enumerate(per_rank):
        # each rank's DataLoader returns its share in order, with the right content
        assert [i for i, _, _ in got] == [i for i in range(n) if (i % 8) // 4 == rank]
        assert all(tokens == expected[i] for i, _, tokens in got)


def test_mixture_is_exact_at_every_prefix(corpora):
    A, B = corpora
    for sources, weights in [([A, B], [0.7, 0.3]), ([A, B, A], [1, 2, 4]), ([B, A], [0.123, 0.877])]:
        ds = StreamingByteDataset(
            list(zip(sources, weights)), seq_len=L, global_batch_size=4, micro_batch_size=2, seed=2, **SMALL
        )
        samples = take(ds, 600)
        w = np.asarray(ds.schedule.weights)
        assert np.allclose(w, np.asarray(weights) / sum(weights), atol=1 / 16384)
        counts = np.zeros(len(sources))
        for n, s in enumerate(samples, 1):
            counts[int(s["source_id"])] += 1
            assert np.all(np.abs(counts - w * n) < 1), (weights, n, counts)
        assert ds.state_dict()["source_counts"] == counts.astype(int).tolist()
    # B (small) wraps into later epochs while A is mid-epoch; each of B's epochs is a permutation
    ds = StreamingByteDataset([(A, 0.7), (B, 0.3)], seq_len=L, global_batch_size=4, micro_batch_size=2, seed=2, **SMALL)
    nb = ds.epoch_size(1)
    b_windows = [ds.window_id(i)[1] for i in range(600) if ds.window_id(i)[0] == 1]
    assert len(b_windows) >= 2 * nb
    assert sorted(b_windows[:nb]) == list(range(nb)) and sorted(b_windows[nb : 2 * nb]) == list(range(nb))
    assert ds.state_at(600)["epoch"] == 0 and ds.state_at(600)["source_counts"][1] == 180


def test_describe_points_at_the_sample_bytes(corpora):
    A, _ = corpora
    ds = StreamingByteDataset([A], seq_len=L, global_batch_size=4, micro_batch_size=2, seed=8, **SMALL)
    for s in take(ds, 40):
        directory, shard, offset = ds.describe(int(s["sample_index"]))
        assert directory == str(A)
        tokens = s["input_ids"].tolist()
        while tokens and tokens[0] == EOD_ID:
            tokens = tokens[1:]
        head = bytes(itertools.takewhile(lambda t: t != EOD_ID, tokens))[:8]
        assert ShardReader(A / shard).read(offset, offset + len(head)).tobytes() == head


def _flip_frame_byte(path):
    data = bytearray(path.read_bytes())
    data[20] ^= 0x10
    path.write_bytes(bytes(data))


def test_corrupt_shard_raises_naming_it_or_is_skipped(corpora, tmp_path, caplog):
    A, _ = corpora
    bad = tmp_path / "A"
    shutil.copytree(A, bad)
    _flip_frame_byte(bad / "shard-000001.bin")
    ds = StreamingByteDataset([bad], seq_len=L, global_batch_size=4, micro_batch_size=2, shuffle=False)
    n = ds.epoch_size()
    with pytest.raises(CorruptShardError, match=r"shard .*shard-000001\.bin: frame 0 fails its checksum"):
        take(ds, n)
    skipping = StreamingByteDataset(
        [bad], seq_len=L, global_batch_size=4, micro_batch_size=2, shuffle=False, on_corrupt="skip"
    )
    with caplog.at_level(logging.WARNING, logger="data_pipeline.shard_source"):
        samples = take(skipping, n)
    assert ids(samples) == list(range(n))
    assert any("skipping corrupt shard" in r.message and "shard-000001.bin" in r.message for r in caplog.records)
    assert all(skipping.describe(i)[1] != "shard-000001.bin" for i in range(n))
    unshuffled = StreamingByteDataset([A], seq_len=L, global_batch_size=4, micro_batch_size=2, shuffle=False)
    clean = {tuple(s["input_ids"].tolist()) for s in take(unshuffled, n)}
    assert all(tuple(s["input_ids"].tolist()) in clean for s in samples)  # substitutes are real windows

    (bad / "shard-000002.bin").write_bytes((bad / "shard-000002.bin").read_bytes()[:-50])
    ds = StreamingByteDataset([bad], seq_len=L, global_batch_size=4, micro_batch_size=2, shuffle=False)
    with pytest.raises(CorruptShardError, match=r"shard-00000[12]\.bin: (frame 0 fails|truncated or resized)"):
        take(ds, n)


def test_skip_leaves_out_whole_shards_the_same_way_on_every_rank_and_after_a_resume(corpora, tmp_path):
    """on_corrupt="skip" checks a shard whole when it is first opened: a window is replaced exactly when it
    touches a damaged shard, even where it reads only healthy frames of it, so the stream is a function of
    the files, and a resumed (or another rank's) stream makes the same replacements."""
    A, _ = corpora
    bad = tmp_path / "A"
    shutil.copytree(A, bad)
    path = bad / "shard-000001.bin"
    reader = ShardReader(path)
    assert reader.n_frames > 1
    offset, size, _ = (int(x) for x in reader._frames[-1])
    reader.close()
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0x10  # only the last frame is damaged
    path.write_bytes(bytes(data))
    kwargs = dict(seq_len=L, global_batch_size=4, micro_batch_size=2, on_corrupt="skip", **SMALL)
    ds = StreamingByteDataset([bad], **kwargs)
    n = 2 * ds.epoch_size()
    whole = take(ds, n)
    touching = {i for i in range(n) if 1 in ds.sources[0].shards_of(ds.window_id(i)[1])}
    assert touching and {i for i, s in enumerate(whole) if bool(s["replaced"])} == touching
    resumed = StreamingByteDataset([bad], **kwargs)
    resumed.load_state_dict(resumed.state_at(n // 2))
    later = take(resumed, n - n // 2)
    same(whole[n // 2:], later)
    assert [bool(s["replaced"]) for s in whole[n // 2:]] == [bool(s["replaced"]) for s in later]


def test_construction_reads_only_the_manifest(corpora, tmp_path):
    A, _ = corpora
    lazy = tmp_path / "A"
    shutil.copytree(A, lazy)
    for shard in lazy.glob("shard-*.bin"):
        shard.unlink()
    ds = StreamingByteDataset([lazy], seq_len=L, global_batch_size=4, micro_batch_size=2)
    assert ds.epoch_size() == StreamingByteDataset([A], seq_len=L, global_batch_size=4, micro_batch_size=2).epoch_size()
    with pytest.raises(CorruptShardError, match=r"shard .*shard-\d{6}\.bin: file not found"):
        next(iter(ds))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch_size=64, micro_batch_size=8, world_size=3),
         r"global_batch_size=64 is not divisible by world_size \* micro_batch_size = 3 \* 8 = 24; "
         r"use a global batch that is a multiple of 24"),
        (dict(rank=2, world_size=2), r"rank must be in \[0, world_size=2\), got 2"),
        (dict(seq_len=0), r"seq_len must be a positive integer, got 0"),
        (dict(on_corrupt="ignore"), r"on_corrupt must be 'error' or 'skip', got 'ignore'"),
        (dict(seq_len=10**7),
         r"holds \d+ tokens in \d+ documents: not one window of seq_len\+1 = 10000001 tokens; "
         r"lower seq_len or add data"),
        (dict(max_samples=-1), r"max_samples must be >= 0, got -1"),
        (dict(shuffle_window=0), r"shuffle_window must be a positive integer or None, got 0"),
    ],
)
def test_bad_arguments_fail_early_with_clear_messages(corpora, kwargs, message):
    A, _ = corpora
    args = dict(seq_len=L, global_batch_size=8, micro_batch_size=2) | kwargs
    with pytest.raises(ValueError, match=message):
        StreamingByteDataset([A], **args)


def test_bad_sources_fail_early(corpora, tmp_path):
    A, B = corpora
    with pytest.raises(ValueError, match=r"sources must be a non-empty list of shard-set directories"):
        StreamingByteDataset([], seq_len=L)
    with pytest.raises(ValueError, match=r"sources must be a non-empty list"):
        StreamingByteDataset(str(A), seq_len=L)
    with pytest.raises(ValueError, match=r"mixture weights must be positive finite numbers, got \[1.0, -0.5\]"):
        StreamingByteDataset([(A, 1.0), (B, -0.5)], seq_len=L)
    with pytest.raises(
        ManifestError, match=r"shard set .*missing: directory not found \(run synergy-preprocess first\)"
    ):
        StreamingByteDataset([tmp_path / "missing"], seq_len=L)


def test_bad_states_are_refused(corpora):
    A, B = corpora
    ds = StreamingByteDataset([A], seq_len=L, global_batch_size=8, micro_batch_size=2, world_size=2)
    other = StreamingByteDataset([B], seq_len=L, global_batch_size=8, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"the state belongs to a different data stream"):
        ds.load_state_dict(other.state_at(8))
    with pytest.raises(ValueError, match=r"state lacks \['fingerprint'\]"):
        ds.load_state_dict({"samples": 8})
    with pytest.raises(
        ValueError, match=r"samples=3 is inside a global batch at a point world_size=2 cannot split evenly"
    ):
        ds.load_state_dict(ds.state_at(3))
    tampered = ds.state_at(8) | {"source_counts": [7]}
    with pytest.raises(ValueError, match=r"source_counts \[7\] do not match samples=8"):
        ds.load_state_dict(tampered)
    with pytest.raises(ValueError, match=r"samples must be a non-negative integer, got -1"):
        ds.state_at(-1)


def test_read_ahead_advises_every_frame_before_it_is_decompressed(corpora, monkeypatch):
    A, _ = corpora
    advised, decompressed, kernel = [], [], []
    real_advise, real_frame = ShardReader.advise, ShardReader.frame

    def advise(self, lo, hi):
        advised.append((self.path.name, lo, hi))
        return real_advise(self, lo, hi)

    def frame(self, k):
        if self._cache.get(frame_key(self.cache_id, k)) is None:
            start = int(self._frame_starts[k])
            decompressed.append((self.path.name, start, start + int(self._frames[k, 2]), len(advised)))
        return real_frame(self, k)

    monkeypatch.setattr(ShardReader, "advise", advise)
    monkeypatch.setattr(ShardReader, "frame", frame)
    monkeypatch.setattr("os.posix_fadvise", lambda fd, offset, length, how: kernel.append((offset, length, how)))
    ds = StreamingByteDataset([A], seq_len=L, global_batch_size=4, micro_batch_size=2, seed=3, **SMALL)
    take(ds, ds.epoch_size())
    assert decompressed and kernel and all(how == os.POSIX_FADV_WILLNEED for _, _, how in kernel)
    for name, start, end, advised_before in decompressed:
        # some range advised earlier for that shard overlaps the frame
        assert any(n == name and lo < end and hi > start for n, lo, hi in advised[:advised_before]), (name, start)
