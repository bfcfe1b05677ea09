"""The throughput paths of the stream: collated micro-batches (decoded straight into one buffer), windows
planned per chunk and copied by the C loop or its Python reference, and the process-wide pool of retired
frame buffers. Each must deliver exactly what the plain paths deliver."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import random

import numpy as np
import pytest
import torch
from data_corpus_helpers import make_documents, write_jsonl
from torch.utils.data import DataLoader

from data_pipeline import shard_source, shards
from data_pipeline.preprocess import preprocess
from data_pipeline.shards import FrameCache, ShardReader, iter_shard_documents, load_manifest
from data_pipeline.stream import StreamingByteDataset

L = 32
SMALL = dict(shuffle_block=8, shuffle_window=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    docs = write_jsonl(root / "a.jsonl", make_documents(150, seed=21, max_len=300))
    # small frames and shards: windows inside one frame, across frames, across shards, with EODs
    preprocess([docs], root / "A", shard_size=3000, frame_bytes=700, min_doc_bytes=0, progress=False)
    return root / "A"


def collate(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def assert_batches_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            dtype = torch.bool if key == "replaced" else torch.int64
            assert g[key].dtype == dtype and torch.equal(g[key], w[key]), key


@pytest.mark.parametrize("pack", [True, False])
def test_batched_stream_is_the_collated_sample_stream(corpus, pack):
    kwargs = dict(seq_len=L, global_batch_size=8, micro_batch_size=4, seed=3, pack=pack, **SMALL)
    n = StreamingByteDataset([corpus], **kwargs).epoch_size()
    limit = 2 * n + 3  # two epochs, over several 256-sample chunks, and a partial last micro-batch
    samples = list(StreamingByteDataset([corpus], max_samples=limit, **kwargs))
    want = [collate(samples[i : i + 4]) for i in range(0, len(samples), 4)]
    got = list(StreamingByteDataset([corpus], max_samples=limit, batched=True, **kwargs))
    assert len(samples) == limit and got[-1]["input_ids"].shape == (3, L)
    assert_batches_equal(got, want)


def test_batched_stream_through_dataloader_workers(corpus):
    kwargs = dict(seq_len=L, global_batch_size=8, micro_batch_size=2, seed=5, max_samples=90, **SMALL)
    want = list(DataLoader(StreamingByteDataset([corpus], **kwargs), batch_size=2, num_workers=2))
    got = list(DataLoader(StreamingByteDataset([corpus], batched=True, **kwargs), batch_size=None, num_workers=2))
    assert_batches_equal(got, want)


def test_batched_state_resumes_at_the_next_micro_batch(corpus):
    kwargs = dict(seq_len=L, global_batch_size=8, micro_batch_size=4, seed=1, batched=True, **SMALL)
    ds = StreamingByteDataset([corpus], **kwargs)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = ds.state_dict()
    assert state == ds.state_at(28)
    expected = next(it)
    resumed = StreamingByteDataset([corpus], **kwargs)
    resumed.load_state_dict(state)
    assert_batches_equal([next(iter(resumed))], [expected])
    assert expected["sample_index"].tolist() == [28, 29, 30, 31]


def test_retired_frame_buffers_are_reused_bounded_and_never_leak(corpus, monkeypatch):
    manifest = load_manifest(corpus)
    path = corpus / manifest.shards[0].name
    gc.collect()  # dead caches of earlier tests retire now, not into the pool checked below
    monkeypatch.setattr(shards, "_retired", [])
    cache = FrameCache(8)
    reader = ShardReader(path, cache=cache)
    for k in range(3):
        reader.frame(k)
    bases = {id(shards._base(a)) for a in cache._items.values()}
    del reader, cache
    gc.collect()
    assert {id(b) for b in shards._retired} == bases  # a dead cache hands its buffers to the pool
    fresh = FrameCache(8)
    assert id(fresh.buffer(10)) in bases and len(shards._retired) == 2  # the next cache takes them
    # reading through caches that reuse retired buffers still returns the right bytes
    documents = list(iter_shard_documents(corpus))
    again = ShardReader(path, cache=FrameCache(1))
    assert [again.document(k) for k in range(manifest.shards[0].documents)] == documents[: manifest.shards[0].documents]
    # the pool is bounded
    monkeypatch.setattr(shards, "RETIRED_BUFFER_BYTES", 3 * (1 << 20))
    monkeypatch.setattr(shards, "_retired", [])
    big = FrameCache(10)
    for k in range(6):
        big.put(("x", k), big.buffer(100)[:100])
    big.clear()
    assert sum(b.nbytes for b in shards._retired) <= 3 * (1 << 20) and len(shards._retired) == 3


def use_fill(monkeypatch, fill: str) -> None:
    """Run the stream with the C build of the planned-window copy ("native") or its Python reference."""
    if fill == "native" and shard_source._native_fill_cached is None:
        pytest.skip("data_pipeline._fill was not built (no C compiler at install time)")
    if fill == "python":
        monkeypatch.setattr(shard_source, "_native_fill_cached", None)


@pytest.mark.parametrize("fill", ["native", "python"])
@pytest.mark.parametrize("max_cache_frames", [None, 1])
def test_stream_content_is_unchanged_by_the_fast_paths(corpus, monkeypatch, max_cache_frames, fill):
    """Shuffled windows equal slices of the corpus token stream, whichever path read them: planned
    windows copied from cached frames, and (with a one-frame cache, which evicts frames that a chunk's
    plan located) windows that fall back to window_bytes and decompress again."""
    from data_corpus_helpers import token_stream

    from data_pipeline import stream as stream_module
    from data_pipeline.shard_source import ShardSetSource

    use_fill(monkeypatch, fill)
    if max_cache_frames is not None:
        monkeypatch.setattr(stream_module, "MAX_CACHE_FRAMES", max_cache_frames)
    fallbacks = []
    window_bytes = ShardSetSource.window_bytes

    def counting_window_bytes(self, w, *a):
        fallbacks.append(w)
        return window_bytes(self, w, *a)

    monkeypatch.setattr(ShardSetSource, "window_bytes", counting_window_bytes)
    stream = token_stream(list(iter_shard_documents(corpus)))
    ds = StreamingByteDataset(
        [corpus], seq_len=L, global_batch_size=8, micro_batch_size=8, seed=2, batched=True, **SMALL
    )
    n = ds.epoch_size()
    if max_cache_frames is not None:
        assert ds.sources[0].cache.capacity == max_cache_frames
    for batch in itertools.islice(iter(ds), -(-n // 8)):
        for i, inputs, labels in zip(batch["sample_index"].tolist(), batch["input_ids"], batch["labels"]):
            w = ds.window_id(i)[1]
            assert torch.equal(inputs, torch.from_numpy(stream[w * L : w * L + L]))
            assert torch.equal(labels, torch.from_numpy(stream[w * L + 1 : w * L + L + 1]))
    # most windows took the planned path; with one cached frame, most fell back
    assert (len(fallbacks) < n / 2) == (max_cache_frames is None), (len(fallbacks), n)


@pytest.mark.parametrize("fill", ["native", "python"])
@pytest.mark.parametrize("max_len", [3, 60])
def test_windows_dense_with_document_ends_hold_every_eod(tmp_path, monkeypatch, max_len, fill):
    """Windows with more document ends than the piecewise copy handles (tiny documents) and with a few:
    every byte and every EOD lands where the corpus stream has it, including across frames and shards."""
    from data_corpus_helpers import token_stream

    use_fill(monkeypatch, fill)
    rng = random.Random(max_len)
    texts = ["".join(rng.choice("ab\né中") for _ in range(rng.randint(0, max_len))) for _ in range(600)]
    docs = write_jsonl(tmp_path / "tiny.jsonl", texts)
    preprocess([docs], tmp_path / "T", shard_size=900, frame_bytes=200, min_doc_bytes=0, progress=False)
    stream = token_stream(list(iter_shard_documents(tmp_path / "T")))
    ds = StreamingByteDataset([tmp_path / "T"], seq_len=L, global_batch_size=4, micro_batch_size=4, seed=3,
                              batched=True, shuffle_block=4, shuffle_window=8)
    n = ds.epoch_size()
    eods_seen = 0
    for batch in itertools.islice(iter(ds), -(-n // 4)):
        for i, inputs, labels in zip(batch["sample_index"].tolist(), batch["input_ids"], batch["labels"]):
            w = ds.window_id(i)[1]
            assert torch.equal(inputs, torch.from_numpy(stream[w * L : w * L + L]))
            assert torch.equal(labels, torch.from_numpy(stream[w * L + 1 : w * L + L + 1]))
            eods_seen += int((inputs == 256).sum())
    assert eods_seen > (n * 9 if max_len == 3 else n // 2)  # the case named was exercised (mask path: > 8 per window)


def test_native_fill_matches_the_python_reference(corpus):
    """The C loop and its Python reference write the same bytes and EOD positions, and hand back the same
    windows: those not planned and those whose frame is not cached. Inconsistent plans raise instead of
    copying out of bounds."""
    native = shard_source._native_fill_cached
    if native is None:
        pytest.skip("data_pipeline._fill was not built (no C compiler at install time)")
    source = shard_source.ShardSetSource(corpus, seq_len=256, cache_frames=64)  # windows with 0-4 EODs
    size = 257
    plan = source.plan(np.arange(source.n_windows))
    for w in range(0, source.n_windows, 2):  # decompress the frames of every other window
        source.window_bytes(w, np.empty(size, dtype=np.uint8), [])
    frames = source.cache.frames
    rows = random.Random(0).sample(range(source.n_windows), source.n_windows)  # any row order
    results = []
    for fill in (native, shard_source._fill_cached):
        buffer, eods = np.zeros((source.n_windows, size), dtype=np.uint8), []
        missed = fill(plan, frames, buffer, size, range(source.n_windows), rows, eods)
        results.append((buffer, sorted(eods), sorted(missed)))
    (buffer_c, eods_c, missed_c), (buffer_py, eods_py, missed_py) = results
    assert np.array_equal(buffer_c, buffer_py) and eods_c == eods_py and missed_c == missed_py
    done = [j for j in range(source.n_windows) if (j, rows[j]) not in set(missed_c)]
    with_eods = [j for j in done if plan.last[j] > plan.first[j]]
    assert len(done) > source.n_windows / 3 and len(with_eods) > 10 and len(missed_c) > 10
    assert max(plan.last[j] - plan.first[j] for j in done) >= 2  # the general piecewise case ran too

    j = done[0]
    buffer = np.zeros((2, size), dtype=np.uint8)
    bad_offset = dataclasses.replace(plan, offsets=[1 << 40] * len(plan.offsets))
    with pytest.raises(ValueError, match=f"window {j} of the plan: its byte range is outside its frame"):
        native(bad_offset, frames, buffer, size, [j], [0], [])
    with pytest.raises(ValueError, match="row 2 is outside the batch buffer"):
        native(plan, frames, buffer, size, [j], [2], [])
    with pytest.raises(IndexError):
        native(plan, frames, buffer, size, [len(plan.keys)], [0], [])


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI promises a C compiler at install time")
def test_ci_builds_the_native_fill():
    """A build failure of the optional extension would leave its tests skipped without a word."""
    assert shard_source._native_fill_cached is not None
