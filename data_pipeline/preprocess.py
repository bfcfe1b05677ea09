"""Corpus -> byte shards (`synergy-preprocess`): parallel, resumable, with a progress bar.

One process reads the inputs in order and cuts the (filtered) document stream into shards of about
--shard-size raw bytes; worker processes compress and write them. Shard k's content is a pure
function of the inputs and options, so a re-run after a crash recomputes the same cut and only
writes the shards that are missing: a shard counts as done when its file was renamed into place
and its sidecar `.progress/shard-NNNNNN.json` records the same content digest. manifest.json is
written last, so its presence means the set is complete.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from data_pipeline import readers
from data_pipeline.shards import (
    DEFAULT_FRAME_BYTES,
    DEFAULT_ZSTD_LEVEL,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ShardInfo,
    load_manifest,
    make_manifest,
    save_manifest,
    write_atomic,
    write_shard,
)

PROGRESS_DIR = ".progress"
LOCK_NAME = ".lock"  # flock'ed while a run works on the output
SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.bin(\.tmp\d+)?$")


class PreprocessError(ValueError):
    """Bad options, an empty corpus, or an output directory that holds something else."""


@dataclass
class PreprocessOptions:
    """Everything that decides the content of the output (workers and progress do not)."""

    text_field: str = "text"  # JSON/parquet/HF field that holds the document text
    split: str = "train"  # Hugging Face split to read
    config: str | None = None  # Hugging Face dataset config name
    shard_size: int = 256 << 20  # target raw bytes per shard
    max_docs: int | None = None  # stop after this many documents are kept (all splits together)
    max_bytes: int | None = None  # stop once this many document bytes are kept (last document kept whole)
    min_doc_bytes: int = 1  # drop documents shorter than this (bytes); 1 drops empty documents
    dedup: bool = False  # drop exact duplicates (by blake2b content hash, kept in memory)
    valid_fraction: float = 0.0  # fraction of documents (by hash) written to OUTPUT/valid; 0 = no split
    seed: int = 0  # keys the validation-split hash
    frame_bytes: int = DEFAULT_FRAME_BYTES  # raw bytes per zstd frame (random-access unit)
    zstd_level: int = DEFAULT_ZSTD_LEVEL  # zstd compression level

    def validate(self) -> None:
        if self.shard_size < 1:
            raise PreprocessError(f"--shard-size must be positive, got {self.shard_size}")
        if self.frame_bytes < 1:
            raise PreprocessError(f"frame_bytes must be positive, got {self.frame_bytes}")
        if self.max_docs is not None and self.max_docs < 1:
            raise PreprocessError(f"--max-docs must be at least 1, got {self.max_docs}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise PreprocessError(f"--max-bytes must be at least 1, got {self.max_bytes}")
        if self.min_doc_bytes < 0:
            raise PreprocessError(f"--min-doc-bytes must be >= 0, got {self.min_doc_bytes}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise PreprocessError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")


def parse_size(text: str | int) -> int:
    """'256MiB', '1GB', '4096' -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise PreprocessError(f"cannot read size {text!r}: use a number of bytes or e.g. 256MiB, 1GB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * scale[unit])


def content_digest(documents: Iterable[bytes]) -> str:
    """Identity of a shard's content, used to recognise already-written shards on resume."""
    h = hashlib.blake2b(digest_size=16)
    for doc in documents:
        h.update(len(doc).to_bytes(8, "little"))
        h.update(doc)
    return h.hexdigest()


def _write_shard_job(
    directory: str, index: int, documents: list[bytes], digest: str, frame_bytes: int, level: int
) -> dict:
    """Runs in a worker: write the shard, then its sidecar (the sidecar marks it done)."""
    path = Path(directory) / f"shard-{index:06d}.bin"
    info = write_shard(path, documents, frame_bytes=frame_bytes, level=level)
    record = {"digest": digest, "info": asdict(info)}
    write_atomic(Path(directory) / PROGRESS_DIR / f"shard-{index:06d}.json", json.dumps(record).encode())
    return asdict(info)


class ShardSetBuilder:
    """Cuts one document stream into shards and gets them written (skipping ones already done)."""

    def __init__(
        self,
        directory: Path,
        plan: dict,
        options: PreprocessOptions,
        pool: ProcessPoolExecutor | None,
        max_in_flight: int,
    ):
        self.directory = directory
        self.plan = plan
        self.options = options
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.buffer: list[bytes] = []
        self.buffer_bytes = 0
        self.shards: list[ShardInfo | Future] = []
        self.pending: deque[Future] = deque()  # submitted, maybe unfinished
        self.reused = 0
        self.complete = False
        self._prepare()

    def _prepare(self) -> None:
        d = self.directory
        if d.exists() and not d.is_dir():
            raise PreprocessError(f"output {d} exists and is not a directory; choose another --output")
        d.mkdir(parents=True, exist_ok=True)
        progress = d / PROGRESS_DIR
        plan_path = progress / "plan.json"
        manifest_path = d / MANIFEST_NAME
        if manifest_path.exists():
            try:
                manifest = load_manifest(d)
            except ManifestError as e:
                raise PreprocessError(
                    f"output {d} holds an unreadable manifest ({e}); delete it or choose another --output"
                ) from None
            if manifest.source != self.plan:
                raise PreprocessError(
                    f"output {d} already holds a different shard set (made from {manifest.source.get('inputs')}); "
                    f"choose another --output or delete {d}"
                )
            self.complete = True
            return
        if plan_path.exists():
            old = json.loads(plan_path.read_text())
            nothing_written = not any(progress.glob("shard-*.json")) and not any(d.glob("shard-*.bin"))
            if old != self.plan and nothing_written:  # e.g. a first attempt that failed on bad input
                write_atomic(plan_path, json.dumps(self.plan, indent=1).encode())
            elif old != self.plan:
                raise PreprocessError(
                    f"output {d} holds an unfinished run with different inputs or options "
                    f"(inputs {old.get('inputs')}); re-run that command, or choose another --output or delete {d}"
                )
        else:
            foreign = [p.name for p in d.iterdir() if p.name not in (PROGRESS_DIR, LOCK_NAME, "train", "valid")]
            if foreign:
                raise PreprocessError(
                    f"output {d} is not empty and holds no synergy shard set ({', '.join(sorted(foreign)[:3])} ...); "
                    f"choose an empty or new --output"
                )
            progress.mkdir(exist_ok=True)
            write_atomic(plan_path, json.dumps(self.plan, indent=1).encode())
        for p in d.iterdir():  # leftovers of a killed writer are never part of the set
            m = SHARD_PATTERN.match(p.name)
            if m and m.group(2):
                p.unlink()

    def add(self, document: bytes) -> None:
        if self.complete:  # finished by an earlier run (its sibling split was not)
            return
        self.buffer.append(document)
        self.buffer_bytes += len(document)
        if self.buffer_bytes >= self.options.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        index = len(self.shards)
        documents, self.buffer, self.buffer_bytes = self.buffer, [], 0
        digest = content_digest(documents)
        sidecar = self.directory / PROGRESS_DIR / f"shard-{index:06d}.json"
        shard = self.directory / f"shard-{index:06d}.bin"
        if sidecar.exists() and shard.exists():
            record = json.loads(sidecar.read_text())
            if record["digest"] == digest and record["info"]["file_bytes"] == shard.stat().st_size:
                self.shards.append(ShardInfo(**record["info"]))
                self.reused += 1
                return
        args = (str(self.directory), index, documents, digest, self.options.frame_bytes, self.options.zstd_level)
        if self.pool is None:
            self.shards.append(ShardInfo(**_write_shard_job(*args)))
            return
        future = self.pool.submit(_write_shard_job, *args)
        self.shards.append(future)
        self.pending.append(future)
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()  # surfaces a worker's error early
        if len(self.pending) > self.max_in_flight:
            self.pending.popleft().result()  # back-pressure: keep memory bounded

    def finish(self) -> Manifest:
        if self.complete:
            return load_manifest(self.directory)
        self.flush()
        infos = [ShardInfo(**s.result()) if isinstance(s, Future) else s for s in self.shards]
        kept = {i.name for i in infos}
        for p in self.directory.iterdir():  # shards of an earlier, longer run of the same plan
            if SHARD_PATTERN.match(p.name) and p.name not in kept:
                p.unlink()
        manifest = make_manifest(infos, source=self.plan)
        save_manifest(self.directory, manifest)
        progress = self.directory / PROGRESS_DIR
        for p in progress.iterdir():
            p.unlink()
        progress.rmdir()
        return manifest


def _valid_hash(document: bytes, seed: int) -> float:
    key = seed.to_bytes(8, "little", signed=True)
    h = hashlib.blake2b(document, digest_size=8, key=key).digest()
    return int.from_bytes(h, "little") / 2**64


def preprocess(
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    workers: int = 1,
    progress: bool = True,
    **options,
) -> dict[str, Path]:
    """Preprocess inputs into shard set(s) under output; returns {"train": dir[, "valid": dir]}.

    options are PreprocessOptions fields (shard_size accepts '256MiB'-style strings).
    Re-running the same call after an interruption completes the set without duplicating documents.
    """
    unknown = set(options) - set(PreprocessOptions.__dataclass_fields__)
    if unknown:
        raise PreprocessError(f"unknown preprocess option(s): {', '.join(sorted(unknown))}")
    if "shard_size" in options:
        options["shard_size"] = parse_size(options["shard_size"])
    opts = PreprocessOptions(**options)
    opts.validate()
    if workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {workers}")
    expanded = readers.expand_inputs([str(i) for i in inputs])
    output = Path(output)
    names = ["train", "valid"] if opts.valid_fraction > 0 else ["train"]
    targets = {n: (output / n if len(names) == 2 else output) for n in names}
    plan_base = {"inputs": [readers.input_identity(i) for i in expanded], "options": asdict(opts)}

    if output.exists() and not output.is_dir():
        raise PreprocessError(f"output {output} exists and is not a directory; choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    with _exclusive(output):
        result = _preprocess_locked(expanded, output, targets, names, plan_base, opts, workers, progress)
        # complete: a run still waiting on this lock will find the set complete, so it can go
        (output / LOCK_NAME).unlink(missing_ok=True)
        return result


@contextmanager
def _exclusive(output: Path):
    """Serialise runs on one output: e.g. every rank of a job preprocessing the sample corpus on
    first use. The second run waits, then finds the set complete. Where the file system has no
    flock, runs are not serialised."""
    with open(output / LOCK_NAME, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _preprocess_locked(expanded, output, targets, names, plan_base, opts, workers, progress) -> dict[str, Path]:
    started = time.time()
    # spawn, not fork: workers must not inherit the open input files (a killed run would keep a
    # pipe open) nor the threads of the parent (tqdm's monitor)
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        builders = {n: ShardSetBuilder(targets[n], dict(plan_base, split=n), opts, pool, 2 * workers) for n in names}
        if all(b.complete for b in builders.values()):
            if progress:
                print(f"synergy-preprocess: {output} is already complete", file=sys.stderr)
            return targets
        counts = _run(expanded, opts, builders, progress)
        manifests = {n: b.finish() for n, b in builders.items()}
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if progress:
        _summary(output, manifests, counts, time.time() - started, sum(b.reused for b in builders.values()))
    return targets


def _run(inputs: list[str], opts: PreprocessOptions, builders: dict[str, ShardSetBuilder], progress: bool) -> dict:
    counts = {"read": 0, "short": 0, "duplicates": 0, "kept": 0, "bytes": 0}
    seen: set[bytes] = set()
    bar = tqdm(unit=" docs", file=sys.stderr, disable=not progress, mininterval=0.5, dynamic_ncols=True)
    started = last = time.time()
    try:
        for document in readers.read_input_documents(inputs, opts.text_field, opts.split, opts.config):
            counts["read"] += 1
            if len(document) < opts.min_doc_bytes:
                counts["short"] += 1
                continue
            if opts.dedup:
                key = hashlib.blake2b(document, digest_size=16).digest()
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
            to_valid = opts.valid_fraction > 0 and _valid_hash(document, opts.seed) < opts.valid_fraction
            split = "valid" if to_valid else "train"
            builders[split].add(document)
            counts["kept"] += 1
            counts["bytes"] += len(document)
            bar.update(1)
            now = time.time()
            if progress and now - last > 0.5:
                last = now
                megabytes = counts["bytes"] / 1e6
                bar.set_postfix_str(f"{megabytes:.1f} MB, {megabytes / (now - started):.1f} MB/s")
            if (opts.max_docs is not None and counts["kept"] >= opts.max_docs) or (
                opts.max_bytes is not None and counts["bytes"] >= opts.max_bytes
            ):
                break
    finally:
        bar.close()
    if counts["kept"] == 0:
        raise PreprocessError(
            f"empty corpus: {counts['read']} documents read from {', '.join(inputs)}, none kept "
            f"({counts['short']} shorter than --min-doc-bytes {opts.min_doc_bytes}, {counts['duplicates']} duplicates)"
        )
    return counts


def _summary(output: Path, manifests: dict[str, Manifest], counts: dict, seconds: float, reused: int) -> None:
    parts = [
        f"{n}: {m.total_documents} docs, {m.total_bytes / 1e6:.2f} MB, {len(m.shards)} shards"
        for n, m in manifests.items()
    ]
    rate = counts["bytes"] / 1e6 / max(seconds, 1e-9)
    print(
        f"synergy-preprocess: wrote {output} in {seconds:.1f} s ({rate:.1f} MB/s): "
        f"{'; '.join(parts)}. Read {counts['read']} docs, dropped {counts['short']} short and "
        f"{counts['duplicates']} duplicates; {reused} shards reused from an earlier run.",
        file=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synergy-preprocess",
        description="Turn corpora (jsonl[.zst|.gz], parquet, txt, globs, Hugging Face datasets) into byte shards.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs, or Hugging Face dataset names/paths")
    p.add_argument("--output", "-o", required=True, help="output shard-set directory")
    p.add_argument("--workers", type=int, default=1, help="compression processes (default 1)")
    p.add_argument("--shard-size", default="256MiB", help="target raw bytes per shard (default 256MiB)")
    p.add_argument("--text-field", default="text", help="field holding the text (default 'text')")
    p.add_argument("--split", default="train", help="Hugging Face split (default 'train')")
    p.add_argument("--config", default=None, help="Hugging Face dataset config name")
    p.add_argument("--max-docs", type=int, default=None, help="keep at most this many documents")
    p.add_argument("--max-bytes", default=None, help="stop once this many bytes are kept (e.g. 1GiB)")
    p.add_argument("--min-doc-bytes", type=int, default=1, help="drop documents shorter than this (default 1)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="fraction to OUTPUT/valid by document hash")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split hash")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preprocess(
            args.inputs,
            args.output,
            workers=args.workers,
            progress=not args.quiet,
            text_field=args.text_field,
            split=args.split,
            config=args.config,
            shard_size=parse_size(args.shard_size),
            max_docs=args.max_docs,
            max_bytes=parse_size(args.max_bytes) if args.max_bytes is not None else None,
            min_doc_bytes=args.min_doc_bytes,
            dedup=args.dedup,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
        )
    except (PreprocessError, readers.InputError) as e:
        print(f"synergy-preprocess: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full output, an unreadable input
        where = e.filename or args.output
        print(f"synergy-preprocess: error: cannot access {where}: {e.strerror or e}; check that the inputs are "
              "readable and --output is on a writable file system with free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synergy-preprocess: interrupted; re-run the same command to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
