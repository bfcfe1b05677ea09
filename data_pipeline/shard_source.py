"""One shard set seen as a sequence of fixed-length training windows.

Packed (pack=True): the set is one token stream, every document followed by EOD_ID, shards in
manifest order. Window i is tokens [i * L, i * L + L + 1): consecutive windows overlap by one token
so every token except the first is a label exactly once. The final partial window is dropped.

One document per window (pack=False): window i is document i (in manifest order), truncated to
L + 1 tokens, then EOD_ID if it fits, then PAD_ID.

Only the manifest is read up front (window counts come from its per-shard totals); a shard's index
is read the first time a window touches it, and frames are decompressed on demand with LRU caches.
Windows are written as bytes (uint8): the positions of EOD_ID and PAD_ID, which do not fit a byte, are
returned to the caller (StreamingByteDataset writes them after its int64 cast).
"""

from __future__ import annotations

import array
import bisect
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.shards import (
    CorruptShardError,
    FrameCache,
    ShardReader,
    file_sha256,
    frame_key,
    load_manifest,
    verify_shard,
)

try:  # the C build of _fill_cached (optional: pip builds it where a compiler exists)
    from data_pipeline._fill import fill_cached as _native_fill_cached  # optional C extension
except ImportError:
    _native_fill_cached = None

log = logging.getLogger(__name__)
MAX_ADVISED_SHARDS = 4  # read-ahead touches at most this many shards per run of windows
RECENTLY_ADVISED = 16  # blocks remembered as advised, so that they are not advised again
MAX_PIECEWISE_EODS = 8  # a window with more documents ending in it is filled through a mask


def _copy_pieces(row: np.ndarray, raw: np.ndarray, eods, start: int, eod_out: list[int], at_row: int) -> None:
    """Fill row with raw around the EOD tokens at stream positions eods (row starts at stream position start).

    The EOD positions are appended to eod_out as at_row + position in row; their bytes in row stay unset."""
    at = 0  # position in raw
    pos = 0  # position in row
    for eod in eods:
        n = eod - start - pos
        row[pos : pos + n] = raw[at : at + n]
        eod_out.append(at_row + pos + n)
        at += n
        pos += n + 1
    row[pos:] = raw[at:]


@dataclass
class WindowPlan:
    """Where the windows of a chunk lie (ShardSetSource.plan): lists indexed by position in the chunk.

    keys[j] is the frame-cache key of the frame holding window j's raw bytes, from offsets[j] on, or -1:
    read it through window_bytes. Its EODs are searches[shards[j]][first[j]:last[j]], stream positions
    in the shard, where the window starts at starts[j]."""

    windows: list[int]
    keys: list[int]
    offsets: list[int]
    shards: list[int]
    starts: list[int]
    first: list[int]
    last: list[int]
    searches: dict[int, array.array] = field(default_factory=dict)


def _fill_cached(plan: WindowPlan, frames: dict, buffer: np.ndarray, size: int, items, rows,
                 eods: list[int]) -> list[tuple[int, int]]:
    """Windows plan[items[i]] into buffer[rows[i]] when plan locates them in a frame that frames (the
    frame cache's dict) holds; returns the (item, row) pairs it did not fill. The reference for
    data_pipeline/_fill.c, and the fallback where that was not built."""
    missed = []
    keys, offsets, first, last = plan.keys, plan.offsets, plan.first, plan.last
    cached = frames.get  # a plain lookup: plan() marked the chunk's frames as used
    for j, r in zip(items, rows):
        frame = cached(keys[j])
        if frame is None:
            missed.append((j, r))
            continue
        o, f, l = offsets[j], first[j], last[j]
        if f == l:
            buffer[r] = frame[o : o + size]
        else:
            _copy_pieces(buffer[r], frame[o : o + size - (l - f)], plan.searches[plan.shards[j]][f:l],
                         plan.starts[j], eods, r * size)
    return missed


class ShardSetSource:
    def __init__(
        self, directory: str | Path, seq_len: int, pack: bool = True, open_shards: int = 16, cache_frames: int = 8,
        check_whole_shards: bool = False,
    ):
        """check_whole_shards: check a shard's sha256 against the manifest when it is first opened, so that
        a damaged shard is refused whole, before any of its windows is used (on_corrupt="skip": which
        windows are skipped is then a function of the files alone, the same on every rank and after a resume)."""
        self.directory = Path(directory)
        self.check_whole_shards = check_whole_shards
        self._sound: set[int] = set()  # shards whose sha256 matched (check_whole_shards)
        self.manifest = load_manifest(self.directory)
        self.seq_len = seq_len
        self.pack = pack
        self.open_shards = open_shards
        self.cache = FrameCache(cache_frames)  # shared by this set's readers
        shards = self.manifest.shards
        docs = np.array([s.documents for s in shards], dtype=np.int64)
        raw = np.array([s.raw_bytes for s in shards], dtype=np.int64)
        self.doc_starts = np.concatenate(([0], np.cumsum(docs)))  # first global document of each shard
        self.token_starts = np.concatenate(([0], np.cumsum(raw + docs)))  # first stream token of each shard
        self._token_starts = self.token_starts.tolist()  # Python ints: fast scalar lookups (bisect)
        self._doc_starts = self.doc_starts.tolist()
        self.total_tokens = int(self.token_starts[-1])
        if pack:
            self.n_windows = max(0, (self.total_tokens - 1) // seq_len)
        else:
            self.n_windows = int(self.doc_starts[-1])
        if self.n_windows == 0:
            raise ValueError(
                f"shard set {self.directory} holds {self.total_tokens} tokens in {int(self.doc_starts[-1])} documents: "
                f"not one window of seq_len+1 = {seq_len + 1} tokens; lower seq_len or add data"
            )
        self.set_hash = self.manifest.set_hash
        self._shard_by_name = {s.name: i for i, s in enumerate(shards)}
        self.bad_shards: dict[int, str] = {}  # shard index -> why it was skipped (on_corrupt="skip")
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._advised: OrderedDict[int, None] = OrderedDict()  # recently advised blocks
        self._eod_positions: dict[int, np.ndarray] = {}
        # the same positions: bisect on them is ~5x faster than searchsorted
        self._eod_search: dict[int, array.array] = {}

    def __getstate__(self):  # DataLoader workers start with no open files
        state = self.__dict__.copy()
        state.update(_readers=OrderedDict(), _eod_positions={}, _eod_search={}, _advised=OrderedDict(),
                     cache=FrameCache(self.cache.capacity))
        return state

    def reader(self, shard: int) -> ShardReader:
        r = self._readers.get(shard)
        if r is not None:
            self._readers.move_to_end(shard)
            return r
        info = self.manifest.shards[shard]
        path = self.directory / info.name
        if self.check_whole_shards and shard not in self._sound:
            self._check_whole(path, info)
            self._sound.add(shard)
        r = ShardReader(path, expected_bytes=info.file_bytes, cache=self.cache, cache_id=shard)
        r.load_index()
        if len(r.doc_ends) != info.documents or r.raw_bytes != info.raw_bytes:
            raise CorruptShardError(
                r.path, f"index holds {len(r.doc_ends)} documents / {r.raw_bytes} bytes, "
                f"manifest says {info.documents} / {info.raw_bytes}"
            )
        self._readers[shard] = r
        # stream position (within the shard) of the EOD that follows each document
        search = array.array("q", (r.doc_ends + np.arange(len(r.doc_ends), dtype=np.int64)).tobytes())
        self._eod_search[shard] = search
        self._eod_positions[shard] = np.frombuffer(search, dtype=np.int64)  # shares the memory
        if len(self._readers) > self.open_shards:
            old, old_reader = self._readers.popitem(last=False)
            old_reader.close()
            self._eod_positions.pop(old, None)
            self._eod_search.pop(old, None)
        return r

    @staticmethod
    def _check_whole(path: Path, info) -> None:
        """Raise CorruptShardError naming what is wrong (the damaged frames, when it can tell) unless the
        file's sha256 is the manifest's."""
        try:
            sound = file_sha256(path) == info.sha256
        except OSError:
            sound = False  # verify_shard says why
        if not sound:
            problems = [p.split(": ", 1)[-1] for p in verify_shard(path, info)]
            specific = [p for p in problems if not p.startswith("sha256 mismatch")]  # e.g. which frame
            raise CorruptShardError(path, "; ".join(specific or problems) or "sha256 mismatch")

    def _shard_bytes(self, shard: int, s: int, e: int, row: np.ndarray, eods: list[int], at_row: int) -> None:
        """Shard-local stream tokens [s, e) into the uint8 row: the raw bytes, with the positions of the
        EOD that follows each document appended to eods (as at_row + position in row)."""
        reader = self.reader(shard)
        search = self._eod_search[shard]
        first = bisect.bisect_left(search, s)
        last = bisect.bisect_left(search, e)
        raw = reader._view(s - first, e - last)  # a view into the frame cache: copied into row right away
        if first == last:
            row[:] = raw
        elif last - first <= MAX_PIECEWISE_EODS:
            _copy_pieces(row, raw, search[first:last], s, eods, at_row)
        else:
            inside = self._eod_positions[shard][first:last] - s
            mask = np.ones(e - s, dtype=bool)
            mask[inside] = False
            row[mask] = raw
            eods.extend((inside + at_row).tolist())

    def shards_of(self, window: int) -> range:
        """Indices of the shards a window reads."""
        if self.pack:
            a = window * self.seq_len
            first = bisect.bisect_right(self._token_starts, a) - 1
            last = bisect.bisect_left(self._token_starts, a + self.seq_len + 1) - 1
            return range(first, last + 1)
        shard = bisect.bisect_right(self._doc_starts, window) - 1
        return range(shard, shard + 1)

    def window_bytes(self, window: int, row: np.ndarray, eods: list[int], at_row: int = 0) -> int:
        """A window's tokens as bytes, the form the hot loop copies (a uint8 copy per byte, no cast).

        row: a uint8 array of seq_len + 1. Tokens that are not bytes are not written: the positions
        holding EOD_ID are appended to eods (plus at_row, so that a caller filling a [n, seq_len + 1]
        buffer can pass row index x (seq_len + 1) and get flat positions), and the return value is the
        number of real tokens: positions from there on hold PAD_ID (pack=False only).
        """
        size = self.seq_len + 1
        if self.pack:
            a = window * self.seq_len
            starts = self._token_starts
            shard = bisect.bisect_right(starts, a) - 1
            if a + size <= starts[shard + 1]:  # the common case: one shard
                self._shard_bytes(shard, a - starts[shard], a + size - starts[shard], row, eods, at_row)
                return size
            for shard in self.shards_of(window):
                lo = max(a, starts[shard])
                hi = min(a + size, starts[shard + 1])
                if hi > lo:
                    self._shard_bytes(shard, lo - starts[shard], hi - starts[shard], row[lo - a : hi - a],
                                      eods, at_row + lo - a)
            return size
        shard = self.shards_of(window)[0]
        k = window - self._doc_starts[shard]
        reader = self.reader(shard)
        ends = reader.doc_ends
        lo = int(ends[k - 1]) if k else 0
        hi = min(int(ends[k]), lo + size)
        n = hi - lo
        row[:n] = reader._view(lo, hi)
        if n == size:
            return size
        eods.append(at_row + n)
        return n + 1

    def plan(self, windows: np.ndarray) -> WindowPlan:
        """Locate a chunk of windows with a few vectorised lookups, so that fill copies each with little
        more than a dictionary lookup.

        A window is planned when it is packed, lies inside one shard and one frame of uniform size, and
        holds at most MAX_PIECEWISE_EODS document ends; the others are read through window_bytes. Only
        shards holding a planned window are opened, at most open_shards of them (a chunk over thousands
        of tiny shards opens none here). The chunk's frames that are cached are marked as used, since
        fill looks them up without touching the LRU order.
        """
        windows = np.asarray(windows, dtype=np.int64)
        n, size = len(windows), self.seq_len + 1
        keys = np.full(n, -1, dtype=np.int64)  # no frame has key -1: fill reads those through window_bytes
        offsets, first, last, shard_of, starts = (np.zeros(n, dtype=np.int64) for _ in range(5))
        searches = {}
        if self.pack and n:
            a = windows * self.seq_len
            shard_of = np.searchsorted(self.token_starts, a, side="right") - 1
            starts = a - self.token_starts[shard_of]
            inside = a + size <= self.token_starts[shard_of + 1]
            for shard in np.unique(shard_of[inside])[: self.open_shards].tolist():
                try:
                    reader = self.reader(shard)
                except CorruptShardError:
                    continue  # its windows go through window_bytes, which raises when they are read
                u = reader.uniform_frame_bytes
                if not u:
                    continue
                at = np.flatnonzero((shard_of == shard) & inside)
                s = starts[at]
                eod_positions = self._eod_positions[shard]
                f, l = eod_positions.searchsorted(s), eod_positions.searchsorted(s + size)
                lo, hi = s - f, s + size - l  # the window's raw bytes in the shard
                k = lo // u
                planned = ((hi - 1) // u == k) & (l - f <= MAX_PIECEWISE_EODS)
                keys[at] = np.where(planned, frame_key(shard, k), -1)
                offsets[at], first[at], last[at] = lo - k * u, f, l
                searches[shard] = self._eod_search[shard]
            self.cache.touch(np.unique(keys[keys >= 0]).tolist())
        return WindowPlan(windows.tolist(), keys.tolist(), offsets.tolist(), shard_of.tolist(), starts.tolist(),
                          first.tolist(), last.tolist(), searches)

    def fill(self, plan: WindowPlan, items, buffer: np.ndarray, rows, eods: list[int]) -> list[tuple[int, int]]:
        """Windows plan[items[i]] into buffer[rows[i]] (buffer: uint8 [n, seq_len + 1]), as window_bytes
        writes them: EOD positions are appended to eods as flat positions in buffer. Returns (row, real
        tokens) of the windows that end in PAD.

        A planned window whose frame is decompressed already costs one dictionary lookup and one copy
        (plus one per document end), in C where data_pipeline._fill was built; any other goes through
        window_bytes (which decompresses).
        """
        size = self.seq_len + 1
        fill_cached = _native_fill_cached or _fill_cached
        padded = []
        for j, r in fill_cached(plan, self.cache.frames, buffer, size, items, rows, eods):
            real = self.window_bytes(plan.windows[j], buffer[r], eods, r * size)
            if real < size:
                padded.append((r, real))
        return padded

    def describe(self, window: int) -> tuple[str, str, int]:
        """(shard-set dir, shard file, raw byte offset in that shard) of a window's first token."""
        shard = self.shards_of(window)[0]
        name = self.manifest.shards[shard].name
        if self.pack:
            s = window * self.seq_len - int(self.token_starts[shard])
            self.reader(shard)
            first = int(np.searchsorted(self._eod_positions[shard], s, side="left"))
            return str(self.directory), name, s - first
        k = window - int(self.doc_starts[shard])
        return str(self.directory), name, int(self.reader(shard).doc_ends[k - 1]) if k else 0

    def advise(self, windows: np.ndarray, gap: int) -> None:
        """Read-ahead: ask the OS for the compressed frames that these upcoming windows need.

        The windows are advised by whole blocks of `gap` consecutive windows (the level-1 shuffle
        blocks they belong to); a block advised lately is not advised again (the next chunks of
        samples come from the same blocks). At most MAX_ADVISED_SHARDS shards are advised per
        block, so tiny shards cannot make this costly.
        """
        if len(windows) == 0:
            return
        for block in np.unique(np.asarray(windows, dtype=np.int64) // gap).tolist():
            if block in self._advised:
                continue
            self._advised[block] = None
            if len(self._advised) > RECENTLY_ADVISED:
                self._advised.popitem(last=False)
            a, b = block * gap, min(block * gap + gap, self.n_windows) - 1  # first and last window
            if self.pack:
                lo_tok, hi_tok = a * self.seq_len, b * self.seq_len + self.seq_len + 1
                first = bisect.bisect_right(self._token_starts, lo_tok) - 1
                for shard in range(first, min(first + MAX_ADVISED_SHARDS, len(self.manifest.shards))):
                    base = self._token_starts[shard]
                    if base >= hi_tok:
                        break
                    if shard in self.bad_shards:
                        continue
                    s, e = max(lo_tok, base) - base, min(hi_tok, self._token_starts[shard + 1]) - base
                    reader = self.reader(shard)
                    eods = self._eod_positions[shard]
                    reader.advise(s - int(eods.searchsorted(s)), e - int(eods.searchsorted(e)))
            else:
                shard = bisect.bisect_right(self._doc_starts, a) - 1
                if shard in self.bad_shards:
                    continue
                reader = self.reader(shard)
                k0 = a - self._doc_starts[shard]
                k1 = min(b - self._doc_starts[shard], len(reader.doc_ends) - 1)
                reader.advise(int(reader.doc_ends[k0 - 1]) if k0 else 0, int(reader.doc_ends[k1]))

    def next_readable(self, window: int) -> int:
        """The first window at or after this one (wrapping) that touches no shard found corrupt."""
        for _ in range(len(self.manifest.shards) + 1):
            bad = [s for s in self.shards_of(window) if s in self.bad_shards]
            if not bad:
                return window
            after = bad[-1] + 1  # first window starting in a later shard
            if self.pack:
                window = -(-int(self.token_starts[after]) // self.seq_len)
            else:
                window = int(self.doc_starts[after])
            if window >= self.n_windows:
                window = 0
        raise CorruptShardError(self.directory, f"every shard is corrupt: {'; '.join(self.bad_shards.values())}")

    def mark_bad(self, error: CorruptShardError) -> None:
        """Remember the shard named by error so that no later window reads it."""
        shard = self._shard_by_name[error.path.name]
        self.bad_shards[shard] = str(error)
        reader = self._readers.pop(shard, None)
        if reader is not None:
            reader.close()
        log.warning("skipping corrupt shard %s (on_corrupt=skip: no window touching it is read): %s", error.path,
                    error.what)
