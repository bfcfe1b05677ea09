"""StreamingByteDataset: deterministic, resumable, elastic streaming of byte windows.

The global stream is a pure function of (manifest hashes, seed, epoch, sample index):

    global index n --mixing--> (source d, index k in d) --> epoch k // N_d, position k % N_d
                   --two-level shuffle--> window id --> tokens (read lazily from the shards)

Rank r of W takes samples [s*G + r*G/W, s*G + (r+1)*G/W) of global batch s. A rank's share is cut
into micro-batches of M samples; DataLoader worker w of K yields micro-batches w, w+K, ... so
DataLoader's round-robin over workers returns them in order. The state is one counter of global
samples, so resuming on another world size or worker count continues the same global stream.
The stream is endless (epochs follow one another, each reshuffled) unless max_samples is set.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.mixing import MixtureSchedule
from data_pipeline.shard_source import ShardSetSource
from data_pipeline.shards import DEFAULT_FRAME_BYTES, CorruptShardError
from data_pipeline.shuffle import WindowOrder
from data_pipeline.vocab import EOD_ID, IGNORE_INDEX, PAD_ID

MAX_CACHE_FRAMES = 64  # decompressed frames kept per source and process (64 MiB at 1 MiB frames)
MAP_CHUNK = 1024  # samples mapped to windows per vectorised call while iterating (fewer numpy calls)
BLOCK_TOKENS = 8 * DEFAULT_FRAME_BYTES  # default level-1 shuffle block, in tokens
GROUP_BLOCKS = 2  # default level-2 group, in blocks
SAMPLE_KEYS = ("input_ids", "labels", "sample_index", "source_id", "replaced")
SourceSpec = str | os.PathLike | tuple[str | os.PathLike, float]


class _Chunk(NamedTuple):
    """The samples __iter__ looks up together: each one's source and window and, unless on_corrupt is
    "skip", where its source's plan says it lies (plans[source], at index items[sample] of that plan)."""

    source_ids: list[int]
    windows: list[int]
    plans: list
    items: Sequence[int]


def _parse_sources(sources: Sequence[SourceSpec]) -> tuple[list[Path], list[float]]:
    if isinstance(sources, (str, os.PathLike)) or not sources:
        raise ValueError(
            "StreamingByteDataset: sources must be a non-empty list of shard-set directories "
            "(or of (directory, weight) pairs); got " + repr(sources)
        )
    dirs, weights = [], []
    for item in sources:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ValueError(f"StreamingByteDataset: source {item!r} must be (directory, weight)")
            directory, weight = item
        else:
            directory, weight = item, 1.0
        dirs.append(Path(directory))
        weights.append(weight)
    return dirs, weights


class StreamingByteDataset(IterableDataset):
    def __init__(
        self,
        sources: Sequence[SourceSpec],
        seq_len: int = 512,
        global_batch_size: int = 64,
        micro_batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pack: bool = True,
        on_corrupt: str = "error",
        shuffle: bool = True,
        shuffle_block: int | None = None,
        shuffle_window: int | None = None,
        max_samples: int | None = None,
        batched: bool = False,
    ):
        """See the module docstring. Extra knobs:

        shuffle: False streams windows in corpus order (debugging, round-trip checks).
        shuffle_block: windows per level-1 block (default: about 8 frames of bytes, 8 MiB / seq_len).
        shuffle_window: positions per level-2 group (default: 2 blocks).
        max_samples: end the stream before this global sample index (default: endless).
        batched: yield collated micro-batches (input_ids/labels [M, L], sample_index/source_id [M])
            instead of samples, in the same order; use DataLoader(ds, batch_size=None). Saves the
            per-sample tensors and the DataLoader's collate copy.
        """
        super().__init__()
        for name, value in (
            ("seq_len", seq_len),
            ("global_batch_size", global_batch_size),
            ("micro_batch_size", micro_batch_size),
            ("world_size", world_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StreamingByteDataset: {name} must be a positive integer, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"StreamingByteDataset: rank must be in [0, world_size={world_size}), got {rank!r}")
        if global_batch_size % (world_size * micro_batch_size) != 0:
            raise ValueError(
                f"StreamingByteDataset: global_batch_size={global_batch_size} is not divisible by "
                f"world_size * micro_batch_size = {world_size} * {micro_batch_size} = {world_size * micro_batch_size}; "
                f"use a global batch that is a multiple of {world_size * micro_batch_size}"
            )
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"StreamingByteDataset: on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        for name, value in (("shuffle_block", shuffle_block), ("shuffle_window", shuffle_window)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"StreamingByteDataset: {name} must be a positive integer or None, got {value!r}")
        if not isinstance(batched, bool):
            raise ValueError(f"StreamingByteDataset: batched must be True or False, got {batched!r}")
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"StreamingByteDataset: max_samples must be >= 0, got {max_samples}")
        dirs, weights = _parse_sources(sources)
        self.schedule = MixtureSchedule(weights)  # validates the weights
        self.seq_len, self.pack, self.seed = seq_len, pack, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.on_corrupt, self.max_samples = on_corrupt, max_samples
        self.batched = batched
        # a level-1 block holds about BLOCK_TOKENS tokens (~8 frames): a frame that straddles two
        # blocks is decompressed once for each, so larger blocks waste less (1.07 decompressions
        # per frame per epoch at 8 frames, 1.2 at 4); a group of 2 blocks reads 16 MiB, as before
        block = shuffle_block or max(1, BLOCK_TOKENS // seq_len)
        group = shuffle_window or GROUP_BLOCKS * block
        # a group of positions touches at most group/block + 2 blocks, each spanning a few frames
        frames_per_block = -(-block * seq_len // DEFAULT_FRAME_BYTES) + 1
        cache_frames = min(MAX_CACHE_FRAMES, (-(-group // block) + 2) * frames_per_block)
        self._block = block
        self.sources = [ShardSetSource(d, seq_len, pack, cache_frames=cache_frames,
                                       check_whole_shards=on_corrupt == "skip") for d in dirs]
        self.orders = [
            WindowOrder(s.n_windows, (seed, int(s.set_hash[:15], 16), i), block, group, shuffle)
            for i, s in enumerate(self.sources)
        ]
        key = (
            f"{[s.set_hash for s in self.sources]}|{self.schedule.numerators}|{seq_len}|{pack}|{seed}|{shuffle}"
            f"|{block}|{group}"
        )
        self.fingerprint = int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest()[:15], 16)
        self._rank_share = global_batch_size // world_size
        self._next_local = 0  # index, in this rank's own sequence, of the next sample to yield
        self._batch_buffer: np.ndarray | None = None  # uint8 buffer the windows of a micro-batch are copied into
        self._batch_buffer_tensor: torch.Tensor | None = None  # the same memory, as a tensor

    # ---- positions -------------------------------------------------------------------------

    def _global_index(self, local: np.ndarray) -> np.ndarray:
        step, within = np.divmod(local, self._rank_share)
        return step * self.global_batch_size + self.rank * self._rank_share + within

    def _windows(self, global_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source id, window id) of each global sample index."""
        source_ids, k = self.schedule.assign(global_index)
        windows = np.empty_like(k)
        single = len(self.sources) == 1
        for d in [0] if single else np.unique(source_ids).tolist():
            sel = slice(None) if single else source_ids == d
            epochs, positions = np.divmod(k[sel], self.sources[d].n_windows)
            if epochs[0] == epochs[-1]:  # the common case: one epoch (epochs only grow along a chunk)
                windows[sel] = self.orders[d].windows(int(epochs[0]), positions)
                continue
            out = np.empty_like(positions)
            for e in np.unique(epochs):
                at = epochs == e
                out[at] = self.orders[d].windows(int(e), positions[at])
            windows[sel] = out
        return source_ids, windows

    def _read_ahead(self, source_ids: np.ndarray, windows: np.ndarray) -> None:
        """Let the OS fetch the compressed frames of the next chunk while it is being decoded."""
        for d in np.unique(source_ids).tolist():
            try:
                self.sources[d].advise(windows[source_ids == d], gap=self._block)
            except CorruptShardError:
                pass  # reported (or skipped) when the window itself is read

    def _read(self, source_id: int, window: int, row: np.ndarray, eods: list[int], at_row: int) -> tuple[int, bool]:
        """window_bytes with on_corrupt="skip": a window on a corrupt shard moves to the next readable one.
        Returns (real tokens, whether the window was replaced)."""
        source = self.sources[source_id]
        wanted = window
        while True:
            window = source.next_readable(window)
            mark = len(eods)
            try:
                return source.window_bytes(window, row, eods, at_row), window != wanted
            except CorruptShardError as e:
                del eods[mark:]  # the failed window's EOD positions
                if e.path is None:
                    raise
                source.mark_bad(e)

    def _plan(self, source_ids: np.ndarray, windows: np.ndarray) -> _Chunk:
        """A chunk's samples with their sources' plans (on_corrupt="skip" reads every window through _read)."""
        if self.on_corrupt != "error":
            return _Chunk(source_ids.tolist(), windows.tolist(), [], [])
        if len(self.sources) == 1:
            return _Chunk(source_ids.tolist(), windows.tolist(), [self.sources[0].plan(windows)], range(len(windows)))
        plans: list = [None] * len(self.sources)
        items = np.empty(len(windows), dtype=np.int64)
        for d in np.unique(source_ids).tolist():
            at = np.flatnonzero(source_ids == d)
            plans[d] = self.sources[d].plan(windows[at])
            items[at] = np.arange(len(at))
        return _Chunk(source_ids.tolist(), windows.tolist(), plans, items.tolist())

    def _micro_batch(
        self, chunk: _Chunk, lo: int, hi: int, index: torch.Tensor, sources: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Samples lo..hi of a chunk, collated: input_ids and labels [n, L] are views of one [n, L + 1] int64 tensor.

        The windows are copied as bytes into a reused uint8 buffer and cast to int64 by one torch call
        for the whole micro-batch (about half the cost of casting row by row in numpy); the few tokens
        that are not bytes (EOD_ID, PAD_ID) are then written by position."""
        size = self.seq_len + 1
        n = hi - lo
        if self._batch_buffer is None or len(self._batch_buffer) < n:
            self._batch_buffer = np.empty((n, size), dtype=np.uint8)
            self._batch_buffer_tensor = torch.from_numpy(self._batch_buffer)
        buffer = self._batch_buffer
        eods: list[int] = []  # flat positions in the [n, size] buffer
        replaced = torch.zeros(n, dtype=torch.bool)  # windows moved off a corrupt shard (on_corrupt="skip")
        source_ids = chunk.source_ids
        if len(self.sources) == 1 and chunk.plans:  # the common case, in one call
            padded = self.sources[0].fill(chunk.plans[0], range(lo, hi), buffer, range(n), eods)
        elif chunk.plans:
            padded = []  # (row, real tokens) of windows that end in PAD
            for d in sorted(set(source_ids[lo:hi])):
                rows = [r for r in range(n) if source_ids[lo + r] == d]
                padded += self.sources[d].fill(chunk.plans[d], [chunk.items[lo + r] for r in rows], buffer, rows, eods)
        else:
            padded = []
            for r in range(n):
                real, replaced[r] = self._read(source_ids[lo + r], chunk.windows[lo + r], buffer[r], eods, r * size)
                if real < size:
                    padded.append((r, real))
        tokens = torch.empty((n, size), dtype=torch.int64)
        tokens.copy_(self._batch_buffer_tensor if n == len(self._batch_buffer) else self._batch_buffer_tensor[:n])
        if eods:
            tokens.numpy().reshape(-1)[eods] = EOD_ID  # numpy: a tenth of the cost of a torch index_put here
        for r, real in padded:
            tokens[r, real:] = PAD_ID
        labels = tokens[:, 1:]
        if padded:
            labels = labels.clone()
            for r, real in padded:
                labels[r, max(real - 1, 0) :] = IGNORE_INDEX
        return {
            "input_ids": tokens[:, :-1],
            "labels": labels,
            "sample_index": index,
            "source_id": sources,
            "replaced": replaced,
        }

    # ---- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        m = self.micro_batch_size
        start = self._next_local
        per_chunk = max(1, MAP_CHUNK // m)  # micro-batches whose windows are looked up together
        first = 0  # this worker's micro-batches are worker, worker + workers, ...
        while True:
            batches = worker + workers * np.arange(first, first + per_chunk, dtype=np.int64)
            local = (start + batches[:, None] * m + np.arange(m, dtype=np.int64)).ravel()
            index = self._global_index(local)
            if self.max_samples is not None:
                keep = index < self.max_samples
                local, index = local[keep], index[keep]
                if len(index) == 0:
                    return
            source_ids, windows = self._windows(index)
            self._read_ahead(source_ids, windows)
            chunk = self._plan(source_ids, windows)
            # the micro-batches' sample_index / source_id tensors, cut by one C++ call each
            index_t, source_t = torch.from_numpy(index).split(m), torch.from_numpy(source_ids).split(m)
            local = local.tolist()
            for b, lo in enumerate(range(0, len(local), m)):  # one micro-batch at a time
                hi = min(lo + m, len(local))
                batch = self._micro_batch(chunk, lo, hi, index_t[b], source_t[b])
                if self.batched:
                    if workers == 1:
                        self._next_local = local[hi - 1] + 1
                    yield batch
                    continue
                # per-sample views, made by four C++ calls instead of four Python calls per sample
                columns = [batch[key].unbind(0) for key in SAMPLE_KEYS]
                for j, q in enumerate(local[lo:hi]):
                    if workers == 1:
                        self._next_local = q + 1
                    yield {key: column[j] for key, column in zip(SAMPLE_KEYS, columns)}
            first += per_chunk

    # ---- state -------------------------------------------------------------------------------

    def state_at(self, samples: int) -> dict:
        """The state after the first `samples` global samples (pure: does not move this dataset)."""
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
            raise ValueError(f"StreamingByteDataset.state_at: samples must be a non-negative integer, got {samples!r}")
        samples = int(samples)
        counts = self.schedule.counts_at(samples)
        epoch = min(c // s.n_windows for c, s in zip(counts, self.sources))
        return {"epoch": epoch, "samples": samples, "source_counts": counts, "fingerprint": self.fingerprint}

    def state_dict(self) -> dict:
        """Position of this iterator (main process; with DataLoader workers use state_at(step * G))."""
        step, within = divmod(self._next_local, self._rank_share)
        return self.state_at(step * self.global_batch_size + within * self.world_size)

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the saved position (also on another world size, at a batch boundary)."""
        missing = {"samples", "fingerprint"} - set(state)
        if missing:
            raise ValueError(
                f"StreamingByteDataset.load_state_dict: state lacks {sorted(missing)}; "
                "pass a dict from state_dict()/state_at()"
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "StreamingByteDataset.load_state_dict: the state belongs to a different data stream "
                "(sources, their contents, weights, seq_len, pack, seed or shuffle settings changed); "
                "resume with the same data settings or start a fresh run"
            )
        expected = self.state_at(state["samples"])
        if "source_counts" in state and list(state["source_counts"]) != expected["source_counts"]:
            raise ValueError(
                f"StreamingByteDataset.load_state_dict: source_counts {state['source_counts']} do not match "
                f"samples={state['samples']} (expected {expected['source_counts']}); the state is corrupted"
            )
        step, within = divmod(int(state["samples"]), self.global_batch_size)
        if within % self.world_size:
            raise ValueError(
                f"StreamingByteDataset.load_state_dict: samples={state['samples']} is inside a global batch at a "
                f"point world_size={self.world_size} cannot split evenly; resume from step * global_batch_size"
            )
        self._next_local = step * self._rank_share + within // self.world_size

    # ---- debugging ---------------------------------------------------------------------------

    def describe(self, sample_index: int) -> tuple[str, str, int]:
        """(shard-set directory, shard file, raw byte offset) where a global sample starts."""
        source_ids, windows = self._windows(np.array([sample_index], dtype=np.int64))
        d, w = int(source_ids[0]), int(windows[0])
        if self.on_corrupt == "skip":
            w = self.sources[d].next_readable(w)
        return self.sources[d].describe(w)

    def window_id(self, sample_index: int) -> tuple[int, int]:
        """(source id, window id in that source) of a global sample: identifies its content."""
        source_ids, windows = self._windows(np.array([sample_index], dtype=np.int64))
        return int(source_ids[0]), int(windows[0])

    def epoch_size(self, source_id: int = 0) -> int:
        """Windows in one epoch of a source."""
        return self.sources[source_id].n_windows
