"""The byte-shard format: writer, lazy reader, manifest and checksums.

A shard is one file:

    b"SYNSHRD1"                                  8-byte magic
    frame 0 .. frame F-1                         independent zstd frames (content checksum on)
    index:  uint64[F, 3]  (file offset, compressed size, raw size) of every frame
            uint64[D]     raw end offset of every document (cumulative, so doc k = [end[k-1], end[k]))
    trailer (40 bytes, little-endian): index offset u64 | F u64 | D u64 | crc32(index) u32 |
            format version u32 | b"SYNIDX01"

Documents are stored back to back with no separator: their boundaries live in the index.
All offsets are 64-bit, so neither a shard nor a frame has a 4 GiB limit. See docs/DATA.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import zstandard

FORMAT_VERSION = 1
SHARD_MAGIC = b"SYNSHRD1"
TRAILER_MAGIC = b"SYNIDX01"
TRAILER = struct.Struct("<QQQII8s")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "synergy-byte-shards"
DEFAULT_FRAME_BYTES = 1 << 20  # raw bytes per zstd frame: the unit of random access
DEFAULT_ZSTD_LEVEL = 3


class CorruptShardError(RuntimeError):
    """A shard file is missing, truncated, or fails a checksum. The message names the file."""

    def __init__(self, path: str | Path, what: str | None = None):
        # one-argument form: a ready message (how DataLoader re-raises a worker's exception)
        super().__init__(f"shard {path}: {what}" if what is not None else str(path))
        self.path = Path(path) if what is not None else None
        self.what = what if what is not None else str(path)


class ManifestError(ValueError):
    """A shard-set directory has no usable manifest.json. The message names the directory."""


@dataclass
class ShardInfo:
    """One shard as recorded in the manifest."""

    name: str = ""  # file name inside the shard-set directory
    file_bytes: int = 0  # size of the shard file on disk
    raw_bytes: int = 0  # document bytes stored (sum of document lengths)
    documents: int = 0  # number of documents
    frames: int = 0  # number of zstd frames
    sha256: str = ""  # hex digest of the whole file


@dataclass
class Manifest:
    """The manifest.json of a shard set, written last (its presence means the set is complete)."""

    format: str = MANIFEST_FORMAT  # identifies the file type
    version: int = FORMAT_VERSION  # shard/manifest format version
    source: dict = field(default_factory=dict)  # how the set was made (inputs, options)
    total_documents: int = 0  # sum over shards
    total_bytes: int = 0  # sum of raw document bytes over shards
    shards: list[ShardInfo] = field(default_factory=list)  # in stream order

    @property
    def set_hash(self) -> str:
        """Content hash of the set: changes whenever any shard's bytes change."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}\0{s.file_bytes}\0{s.documents}\0{s.sha256}\n".encode())
        return h.hexdigest()

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps({**data, MANIFEST_CHECKSUM_KEY: _manifest_checksum(data)}, indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> Manifest:
        """The manifest of `data` (a parsed manifest.json) after every check that needs no shard file:
        format, version, its own checksum, field types, totals against the shard entries."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"{where}: not a synergy shard-set manifest (format={found!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format version {data.get('version')} is not supported (this code reads "
                f"version {FORMAT_VERSION}); re-run synergy-preprocess with this version"
            )
        fix = f"restore it, or re-create the set with synergy-preprocess; `synergy-data verify {Path(where).parent}` " \
              "lists every problem"
        unknown = set(data) - {f.name for f in fields(cls)} - {MANIFEST_CHECKSUM_KEY}
        if unknown:  # e.g. a misspelt checksum key, which would otherwise turn the check off
            raise ManifestError(f"{where}: unknown keys {sorted(unknown)}; {fix}")
        body = {k: v for k, v in data.items() if k != MANIFEST_CHECKSUM_KEY}
        if MANIFEST_CHECKSUM_KEY in data and data[MANIFEST_CHECKSUM_KEY] != _manifest_checksum(body):
            raise ManifestError(f"{where}: edited or damaged after it was written (its checksum does not match); {fix}")
        try:
            shards = [ShardInfo(**s) for s in data.get("shards", [])]
            manifest = cls(source=dict(data.get("source", {})), total_documents=int(data["total_documents"]),
                           total_bytes=int(data["total_bytes"]), shards=shards)
            docs, raw = sum(int(s.documents) for s in shards), sum(int(s.raw_bytes) for s in shards)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed ({type(e).__name__}: {e}); {fix}") from None
        if (docs, raw) != (manifest.total_documents, manifest.total_bytes):
            raise ManifestError(f"{where}: totals ({manifest.total_documents} documents, {manifest.total_bytes} "
                                f"bytes) disagree with the shard entries ({docs}, {raw}); {fix}")
        return manifest


MANIFEST_CHECKSUM_KEY = "manifest_sha256"  # absent in manifests written before it existed: not checked there


def _manifest_checksum(data: dict) -> str:
    """sha256 of a manifest's content (without this checksum): an edit of any entry (a shard's sha256,
    a total) is found when the manifest is read, before the edited value can change the data order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def load_manifest(directory: str | Path) -> Manifest:
    """Read DIR/manifest.json; a missing one means the set is absent or was never finished."""
    path = Path(directory) / MANIFEST_NAME
    if Path(directory).is_file():
        raise ManifestError(f"shard set {directory}: a file, not a shard-set directory (pass the directory that "
                            "holds manifest.json)")
    if not Path(directory).is_dir():
        raise ManifestError(f"shard set {directory}: directory not found (run synergy-preprocess first)")
    if not path.is_file():
        raise ManifestError(
            f"shard set {directory}: no {MANIFEST_NAME} (preprocessing did not finish; "
            f"re-run the same synergy-preprocess command to complete it)"
        )
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); re-create the set with synergy-preprocess") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    return Manifest.from_dict(data, where=str(path))


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, flush to disk, then rename into place."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_manifest(directory: str | Path, manifest: Manifest) -> None:
    write_atomic(Path(directory) / MANIFEST_NAME, manifest.to_json().encode())


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(
    path: str | Path,
    documents: Sequence[bytes],
    frame_bytes: int = DEFAULT_FRAME_BYTES,
    level: int = DEFAULT_ZSTD_LEVEL,
) -> ShardInfo:
    """Write documents to a new shard at path (atomically) and return its manifest entry."""
    path = Path(path)
    raw = b"".join(documents)
    lengths = np.fromiter((len(d) for d in documents), dtype=np.uint64, count=len(documents))
    doc_ends = np.cumsum(lengths, dtype=np.uint64)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    frames = []
    with open(tmp, "wb") as f:
        f.write(SHARD_MAGIC)
        digest.update(SHARD_MAGIC)
        offset = len(SHARD_MAGIC)
        view = memoryview(raw)
        for start in range(0, len(raw), frame_bytes):
            chunk = view[start : start + frame_bytes]
            blob = compressor.compress(chunk)
            f.write(blob)
            digest.update(blob)
            frames.append((offset, len(blob), len(chunk)))
            offset += len(blob)
        index = np.asarray(frames, dtype="<u8").reshape(-1, 3).tobytes() + doc_ends.astype("<u8").tobytes()
        trailer = TRAILER.pack(offset, len(frames), len(documents), zlib.crc32(index), FORMAT_VERSION, TRAILER_MAGIC)
        f.write(index)
        f.write(trailer)
        digest.update(index)
        digest.update(trailer)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return ShardInfo(
        name=path.name,
        file_bytes=size,
        raw_bytes=len(raw),
        documents=len(documents),
        frames=len(frames),
        sha256=digest.hexdigest(),
    )


FRAME_KEY_SPAN = 1 << 32  # frames per shard that frame keys can tell apart


def frame_key(cache_id: int, k: int) -> int:
    """The FrameCache key of frame k of the reader with this cache_id (an int: hashing is cheapest)."""
    return cache_id * FRAME_KEY_SPAN + k


_reader_ids = itertools.count(1 << 31)  # default cache ids, above any shard index a source gives out
RETIRED_BUFFER_BYTES = 64 << 20  # at most this much memory of dead caches is kept for reuse, per process
_retired: list[np.ndarray] = []  # frame buffers of caches that were cleared or garbage collected


def _retire(items: OrderedDict[int, np.ndarray], free: list[np.ndarray]) -> None:
    """Keep a dead cache's buffers (bounded) for the next cache: its first frames then decompress
    into memory that is already mapped instead of faulting in fresh pages (~40% slower)."""
    held = sum(b.nbytes for b in _retired)
    for buf in free + [_base(a) for a in items.values()]:
        if held + buf.nbytes > RETIRED_BUFFER_BYTES:
            break
        _retired.append(buf)
        held += buf.nbytes
    items.clear()
    free.clear()


def _base(arr: np.ndarray) -> np.ndarray:
    return arr.base if isinstance(arr.base, np.ndarray) else arr


class FrameCache:
    """A small LRU of decompressed frames, shareable by the readers of one shard set.

    Evicted frames' buffers are recycled for the next decompression: writing into memory that is
    already mapped is markedly faster than into fresh pages. For the same reason the buffers of a
    cache that is cleared or garbage collected go to a process-wide pool (RETIRED_BUFFER_BYTES).
    A frame array is therefore only valid until the next decompression.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._free: list[np.ndarray] = []  # buffers of evicted frames
        self._scratch = bytearray()  # compressed bytes of the frame being decompressed
        weakref.finalize(self, _retire, self._items, self._free).atexit = False  # nothing to keep at exit

    def get(self, key: int) -> np.ndarray | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    @property
    def frames(self) -> dict[int, np.ndarray]:
        """The cached frames by key, for hot loops that look them up without touching the LRU order
        (they touch() their frames instead). Read only: use put() to add."""
        return self._items

    def touch(self, keys: Iterable[int]) -> None:
        """Mark these frames (those cached) as just used."""
        for key in keys:
            if key in self._items:
                self._items.move_to_end(key)

    def put(self, key: int, value: np.ndarray) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            _, old = self._items.popitem(last=False)
            if len(self._free) < 2:
                self._free.append(_base(old))

    def buffer(self, size: int) -> np.ndarray:
        """A writable uint8 buffer of at least size bytes (recycled when possible)."""
        for pool in (self._free, _retired):
            while pool:
                buf = pool.pop()
                if len(buf) >= size:
                    return buf
        return np.empty(max(size, DEFAULT_FRAME_BYTES), dtype=np.uint8)

    def compressed(self, size: int) -> memoryview:
        """A reusable scratch buffer of exactly size bytes for one compressed frame."""
        if len(self._scratch) < size:
            self._scratch = bytearray(max(size, 2 * len(self._scratch)))
        return memoryview(self._scratch)[:size]

    def clear(self) -> None:
        _retire(self._items, self._free)


class ShardReader:
    """Random access to one shard; the index is read on first use, frames on demand.

    expected_bytes (from the manifest) lets a truncated file be reported before anything else.
    Decompressed frames are kept in a small LRU cache (pass one to share it between readers).
    """

    def __init__(self, path: str | Path, expected_bytes: int | None = None, cache: FrameCache | None = None,
                 cache_id: int | None = None):
        """cache_id: frame k is cached under frame_key(cache_id, k); readers that share a cache need
        distinct ids (ShardSetSource uses the shard's index); default: an id unique in this process."""
        self.path = Path(path)
        self.cache_id = next(_reader_ids) if cache_id is None else cache_id
        self.expected_bytes = expected_bytes
        self._frames: np.ndarray | None = None  # int64 [F, 3]: offset, compressed size, raw size
        self.uniform_frame_bytes = 0  # raw bytes of every frame but the last, which holds no more; 0: sizes vary
        self._frame_starts: np.ndarray | None = None  # int64 [F+1]: raw offset where each frame starts
        self._doc_ends: np.ndarray | None = None  # int64 [D]
        self._cache = cache if cache is not None else FrameCache(4)
        self._file = None
        self._dctx = zstandard.ZstdDecompressor()

    def _fail(self, what: str) -> CorruptShardError:
        return CorruptShardError(self.path, what)

    def _open(self):
        if self._file is None:
            try:
                self._file = open(self.path, "rb")
            except FileNotFoundError:
                raise self._fail("file not found (the shard set is incomplete; re-run preprocessing)") from None
            except OSError as e:  # permissions, a directory in its place, an I/O error
                raise self._fail(f"cannot be read ({e.strerror}); check the file and its permissions") from None
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):  # picklable for DataLoader workers: drop the open file and cache
        state = self.__dict__.copy()
        state.update(_file=None, _cache=FrameCache(state["_cache"].capacity), _dctx=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._dctx = zstandard.ZstdDecompressor()

    def load_index(self) -> None:
        if self._doc_ends is not None:
            return
        try:
            self._load_index()
        except OSError as e:  # an I/O error of the disk or file system
            raise self._fail(f"index cannot be read ({e.strerror})") from None

    def _load_index(self) -> None:
        fd = self._open().fileno()
        size = os.fstat(fd).st_size
        if self.expected_bytes is not None and size != self.expected_bytes:
            raise self._fail(f"truncated or resized: {size} bytes on disk, manifest says {self.expected_bytes}")
        if size < len(SHARD_MAGIC) + TRAILER.size:
            raise self._fail(f"truncated: only {size} bytes")
        if os.pread(fd, len(SHARD_MAGIC), 0) != SHARD_MAGIC:
            raise self._fail("bad magic at start of file (not a synergy shard, or corrupted)")
        trailer = os.pread(fd, TRAILER.size, size - TRAILER.size)
        index_offset, n_frames, n_docs, crc, version, magic = TRAILER.unpack(trailer)
        if magic != TRAILER_MAGIC:
            raise self._fail("bad trailer magic (file truncated or corrupted at its end)")
        if version != FORMAT_VERSION:
            raise self._fail(f"format version {version}, this code reads {FORMAT_VERSION}; re-create the set with "
                             "this version's synergy-preprocess")
        if n_frames >= FRAME_KEY_SPAN:
            raise self._fail(
                f"{n_frames} frames: more than this reader can address ({FRAME_KEY_SPAN}); re-shard with larger frames"
            )
        index_bytes = 8 * (3 * n_frames + n_docs)
        if index_offset + index_bytes + TRAILER.size != size:
            raise self._fail("index size does not match the file size (truncated or corrupted)")
        index = os.pread(fd, index_bytes, index_offset)
        if zlib.crc32(index) != crc:
            raise self._fail("index checksum mismatch (corrupted footer)")
        table = np.frombuffer(index, dtype="<u8", count=3 * n_frames).reshape(-1, 3).astype(np.int64)
        doc_ends = np.frombuffer(index, dtype="<u8", offset=24 * n_frames).astype(np.int64)
        frame_starts = np.zeros(n_frames + 1, dtype=np.int64)
        np.cumsum(table[:, 2], out=frame_starts[1:])
        expected_offsets = len(SHARD_MAGIC) + np.concatenate(([0], np.cumsum(table[:, 1])[:-1])) if n_frames else []
        if n_frames and (
            not np.array_equal(table[:, 0], expected_offsets) or table[-1, 0] + table[-1, 1] != index_offset
        ):
            raise self._fail("frame table is inconsistent (corrupted footer)")
        total = int(frame_starts[-1])
        if (n_docs and int(doc_ends[-1]) != total) or np.any(np.diff(doc_ends) < 0):
            raise self._fail("document boundaries are inconsistent with the frames (corrupted footer)")
        self._frames, self._frame_starts, self._doc_ends = table, frame_starts, doc_ends
        self._raw_total = total
        uniform = n_frames > 0 and bool(np.all(table[:-1, 2] == table[0, 2]) and table[-1, 2] <= table[0, 2])
        self.uniform_frame_bytes = int(table[0, 2]) if uniform and table[0, 2] > 0 else 0

    @property
    def doc_ends(self) -> np.ndarray:
        self.load_index()
        return self._doc_ends

    @property
    def raw_bytes(self) -> int:
        self.load_index()
        return int(self._frame_starts[-1])

    @property
    def n_frames(self) -> int:
        self.load_index()
        return len(self._frames)

    def frame(self, k: int) -> np.ndarray:
        """Decompressed frame k as uint8 (cached)."""
        cached = self._cache.get(frame_key(self.cache_id, k))
        if cached is not None:
            return cached
        self.load_index()
        offset, csize, rsize = (int(x) for x in self._frames[k])
        blob = self._cache.compressed(csize)  # reused: a fresh bytes object would fault in new pages
        try:
            got = os.preadv(self._open().fileno(), [blob], offset)
        except OSError as e:
            raise self._fail(f"frame {k} cannot be read ({e.strerror})") from None
        if got != csize:
            raise self._fail(f"truncated: frame {k} is cut short")
        arr = self._cache.buffer(rsize)[:rsize]
        view = memoryview(arr)
        got = 0
        try:
            with self._dctx.stream_reader(blob) as stream:
                while got < rsize:
                    n = stream.readinto(view[got:])
                    if n == 0:
                        break
                    got += n
                extra = stream.read(1)  # reaches the frame end: zstd checks the content checksum there
        except zstandard.ZstdError as e:
            raise self._fail(f"frame {k} fails its checksum or cannot be decompressed ({e})") from None
        if got != rsize or extra:
            raise self._fail(f"frame {k} decompressed to {got + len(extra)}+ bytes, index says {rsize}")
        self._cache.put(frame_key(self.cache_id, k), arr)
        return arr

    def advise(self, lo: int, hi: int) -> None:
        """Ask the OS to read ahead the compressed frames holding raw bytes [lo, hi) (no-op where
        posix_fadvise does not exist). Nothing is decompressed."""
        if not hasattr(os, "posix_fadvise") or hi <= lo:
            return
        self.load_index()
        starts = self._frame_starts
        first = int(starts.searchsorted(lo, side="right")) - 1
        last = int(starts.searchsorted(hi, side="left")) - 1
        offset = int(self._frames[first, 0])
        end = int(self._frames[last, 0] + self._frames[last, 1])
        os.posix_fadvise(self._open().fileno(), offset, end - offset, os.POSIX_FADV_WILLNEED)

    def _view(self, lo: int, hi: int) -> np.ndarray:
        """Raw bytes [lo, hi): a view into the frame cache when one frame holds them, else a new
        array. A view is only valid until the next frame is decompressed (buffers are recycled)."""
        if self._doc_ends is None:
            self.load_index()
        starts = self._frame_starts
        if not 0 <= lo <= hi <= self._raw_total:
            raise IndexError(f"shard {self.path}: byte range [{lo}, {hi}) outside [0, {self._raw_total})")
        if lo == hi:
            return np.empty(0, dtype=np.uint8)
        u = self.uniform_frame_bytes
        if u:  # every frame but the last holds u bytes: plain division
            first, last = lo // u, (hi - 1) // u
        else:
            first = int(starts.searchsorted(lo, side="right")) - 1
            last = int(starts.searchsorted(hi, side="left")) - 1
        if first == last:
            base = first * u if u else int(starts[first])
            return self.frame(first)[lo - base : hi - base]
        out = np.empty(hi - lo, dtype=np.uint8)
        for k in range(first, last + 1):  # copy each frame's part before the next one may evict it
            a, b = max(lo, int(starts[k])), min(hi, int(starts[k + 1]))
            out[a - lo : b - lo] = self.frame(k)[a - int(starts[k]) : b - int(starts[k])]
        return out

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Raw bytes [lo, hi) of the shard as a new uint8 array, decompressing only the frames they touch."""
        return self._view(lo, hi).copy()

    def document(self, k: int) -> bytes:
        ends = self.doc_ends
        lo = int(ends[k - 1]) if k else 0
        return self.read(lo, int(ends[k])).tobytes()

    def documents(self) -> Iterator[bytes]:
        for k in range(len(self.doc_ends)):
            yield self.document(k)


def iter_shard_documents(directory: str | Path) -> Iterator[bytes]:
    """Every document of a shard set, in stream order."""
    manifest = load_manifest(directory)
    for info in manifest.shards:
        reader = ShardReader(Path(directory) / info.name, expected_bytes=info.file_bytes)
        yield from reader.documents()
        reader.close()


def verify_shard(path: Path, info: ShardInfo) -> list[str]:
    """Every problem found in one shard (empty when it is sound): size, sha256, index, every frame."""
    problems = []
    if not path.is_file():
        return [f"shard {path}: file not found"]
    size = path.stat().st_size
    if size != info.file_bytes:
        problems.append(f"shard {path}: truncated or resized: {size} bytes on disk, manifest says {info.file_bytes}")
    try:
        digest = file_sha256(path)
    except OSError as e:
        return problems + [f"shard {path}: cannot be read ({e.strerror})"]
    if digest != info.sha256:
        problems.append(f"shard {path}: sha256 mismatch (file {digest[:16]}..., manifest {info.sha256[:16]}...)")
    reader = ShardReader(path)
    try:
        reader.load_index()
        for k in range(reader.n_frames):
            reader.frame(k)
            reader._cache.clear()
        if len(reader.doc_ends) != info.documents or reader.raw_bytes != info.raw_bytes:
            problems.append(
                f"shard {path}: index holds {len(reader.doc_ends)} documents / {reader.raw_bytes} bytes, "
                f"manifest says {info.documents} / {info.raw_bytes}"
            )
    except CorruptShardError as e:
        problems.append(str(e))
    finally:
        reader.close()
    return problems


def verify_shard_set(directory: str | Path) -> list[str]:
    """Every problem in a shard set (empty list = all checksums, indexes and totals agree)."""
    directory = Path(directory)
    try:
        manifest = load_manifest(directory)
    except ManifestError as e:
        return [str(e)]
    problems = []
    for info in manifest.shards:
        problems.extend(verify_shard(directory / info.name, info))
    docs = sum(s.documents for s in manifest.shards)
    raw = sum(s.raw_bytes for s in manifest.shards)
    if docs != manifest.total_documents or raw != manifest.total_bytes:
        problems.append(
            f"{directory / MANIFEST_NAME}: totals ({manifest.total_documents} documents, {manifest.total_bytes} bytes) "
            f"disagree with the shard entries ({docs}, {raw})"
        )
    return problems


def make_manifest(shards: Iterable[ShardInfo], source: dict) -> Manifest:
    shards = list(shards)
    return Manifest(
        source=source,
        total_documents=sum(s.documents for s in shards),
        total_bytes=sum(s.raw_bytes for s in shards),
        shards=shards,
    )
