"""Corpus readers: turn preprocessing inputs (files, globs, Hugging Face datasets) into documents.

Every reader streams: memory stays bounded whatever the corpus size. Each document comes out as
bytes (UTF-8 for text). Errors name the input, the record and the fix.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

LOCAL_SUFFIXES = (".jsonl.zst", ".jsonl.gz", ".jsonl", ".json.zst", ".json.gz", ".json", ".parquet", ".txt")


class InputError(ValueError):
    """A preprocessing input is missing, unreadable, or holds something that is not text."""


def _suffix(path: str) -> str | None:
    lower = path.lower()
    for suffix in LOCAL_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or _suffix(name) is not None


def expand_inputs(inputs: list[str]) -> list[str]:
    """Expand globs and check local files exist; names that are not paths stay (HF dataset names)."""
    if not inputs:
        raise InputError("no inputs given: pass at least one file, glob or Hugging Face dataset name")
    expanded: list[str] = []
    for item in inputs:
        item = str(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            if not files:
                raise InputError(f"input pattern {item!r} matches no files (check the glob and quote it in the shell)")
            expanded.extend(os.path.abspath(m) for m in files)
        elif os.path.exists(os.path.expanduser(item)):
            expanded.append(os.path.abspath(os.path.expanduser(item)))
        elif _looks_like_path(item):
            raise InputError(f"input not found: {item} (check the path)")
        else:
            expanded.append(item)  # a Hugging Face dataset name
    return expanded


def _to_bytes(value, field: str, where: str) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"{where}: field {field!r} is not valid Unicode text ({e})") from None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise InputError(
        f"{where}: field {field!r} holds {type(value).__name__}, not text "
        f"(pass --text-field with the name of a string field)"
    )


def _field(record, field: str, where: str):
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise InputError(f"{where}: no field {field!r} (fields: {keys}); pass --text-field NAME")
    return record[field]


def _open_text_lines(path: str, suffix: str) -> io.BufferedReader:
    raw = open(path, "rb")
    if suffix.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    if suffix.endswith(".gz"):
        return gzip.open(raw)
    return raw


def _lines(path: str, suffix: str) -> Iterator[bytes]:
    """The lines of a JSON Lines file, decompressed; a damaged compressed file is an InputError.
    A line is held whole in memory (see docs/DATA.md on very long lines)."""
    try:
        with _open_text_lines(path, suffix) as f:
            yield from f
    except (zstandard.ZstdError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot decompress ({e}); the file is damaged or not {suffix}") from None


def read_jsonl(path: str, suffix: str, field: str) -> Iterator[bytes]:
    for number, line in enumerate(_lines(path, suffix), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:  # JSON text must be UTF-8; a .txt input keeps any bytes
            raise InputError(f"{where}: not valid UTF-8 (byte {e.start} of the line); JSON Lines must be "
                             "UTF-8 text (a binary or Latin-1 file? convert it, or pass raw bytes as .txt)") from None
        yield _to_bytes(_field(record, field, where), field, where)


def read_parquet(path: str, field: str) -> Iterator[bytes]:
    import pyarrow.parquet as pq  # optional dependency: only Parquet inputs need pyarrow

    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        keys = ", ".join(parquet.schema_arrow.names)
        raise InputError(f"{path}: no column {field!r} (columns: {keys}); pass --text-field NAME")
    row = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _to_bytes(value, field, f"{path} row {row}")


def read_txt(path: str) -> Iterator[bytes]:
    """A .txt file is one document (its exact bytes)."""
    with open(path, "rb") as f:
        yield f.read()


def read_hf_dataset(name: str, field: str, split: str, config: str | None) -> Iterator[bytes]:
    try:
        import datasets  # optional dependency: only Hugging Face dataset inputs need it (slow to import)
    except ImportError:
        what = "a directory" if os.path.isdir(name) else "not a local file"
        raise InputError(f"input {name}: {what}, so it is read as a Hugging Face dataset, which needs the "
                         "`datasets` package (pip install datasets); or pass the files themselves") from None

    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; we re-raise with the fix
        raise InputError(
            f"cannot load Hugging Face dataset {name!r} (config={config!r}, split={split!r}): {e}. "
            f"Check the name/path, --config and --split"
        ) from None
    for number, record in enumerate(dataset, 1):
        where = f"dataset {name} ({split}) record {number}"
        yield _to_bytes(_field(record, field, where), field, where)


def read_input_documents(
    inputs: list[str], text_field: str = "text", split: str = "train", config: str | None = None
) -> Iterator[bytes]:
    """All documents of all inputs, in input order (inputs already expanded)."""
    for item in inputs:
        if os.path.isdir(item) and _suffix(item):
            raise InputError(f"input {item} is a directory, not a {_suffix(item)} file; pass the file(s) inside it "
                             "(e.g. a quoted glob 'DIR/*.jsonl')")
        suffix = _suffix(item) if os.path.exists(item) and not os.path.isdir(item) else None
        if suffix in (".jsonl.zst", ".jsonl.gz", ".jsonl", ".json.zst", ".json.gz", ".json"):
            yield from read_jsonl(item, suffix, text_field)
        elif suffix == ".parquet":
            yield from read_parquet(item, text_field)
        elif suffix == ".txt":
            yield from read_txt(item)
        elif os.path.isfile(item):
            raise InputError(
                f"input {item}: unknown file type (supported: {', '.join(LOCAL_SUFFIXES)}, or a Hugging Face dataset)"
            )
        else:
            yield from read_hf_dataset(item, text_field, split, config)


def input_identity(item: str) -> str:
    """How an input is recorded in the manifest: absolute path for local files, name otherwise."""
    return str(Path(item).resolve()) if os.path.exists(item) else item
