"""`synergy-bench data`: how fast the byte stream feeds training, against the limit of its path.

All in one run, on one core (the process pins itself to a single CPU):
- raw: plain sequential zstd decompression of our shards' bytes (the physical limit of the path);
- ours: StreamingByteDataset delivering shuffled windows of seq_len bytes (input_ids + labels);
- startup: a fresh process opens a synthetic set of 10,000 shards and takes its first batch;
  time and added resident memory are measured after the imports.
The comparisons with MosaicML `streaming` and Hugging Face `datasets` live in the repository's
benchmarks/ folder (`python -m benchmarks.data_anchors`), which runs this benchmark and adds them.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zstandard
from torch.utils.data import DataLoader

from data_pipeline.preprocess import preprocess
from data_pipeline.shards import (
    MANIFEST_NAME,
    SHARD_MAGIC,
    TRAILER,
    load_manifest,
    make_manifest,
    save_manifest,
    write_shard,
)
from data_pipeline.stream import StreamingByteDataset
from synergy_dist.bench.results import BenchResults, Target, figure_from, missing, ratio
from synergy_dist.bench.timing import Stopwatch, peak_rss_kib, pin_to_one_core, rss_kib

DEFAULT_CORPORA = ("pydocs-train.jsonl.zst", "pystdlib-code.jsonl.zst")


def default_cache_dir() -> str:
    """Where the benchmark's shard sets are cached unless told otherwise: <tmp>/synergy-bench-cache."""
    return str(Path(tempfile.gettempdir()) / "synergy-bench-cache")


@dataclass
class DataBenchConfig:
    """Settings of one data benchmark run."""

    inputs: list[str] = field(default_factory=list)  # jsonl.zst corpora (the "text" field is used)
    cache_dir: str = field(default_factory=default_cache_dir)  # shard sets, reused across runs
    seq_len: int = 8192  # bytes per training window
    repeats: int = 3  # measurements per startup figure and per anchor figure (the median is reported)
    stream_repeats: int = 9  # measurements of raw decompression and of our stream (~50 ms each; noisy machines)
    shard_size: str = "8MiB"  # raw bytes per shard of the benchmark set (several shards: shard-level shuffle)
    startup_shards: int = 10_000  # shards in the synthetic set for time-to-first-batch
    startup_shard_bytes: int = 4096  # raw bytes in each synthetic shard
    seed: int = 0  # shuffle seed of the first repeat (repeat r uses seed + r)


def _inputs_key(inputs: list[str], shard_size: str) -> str:
    h = hashlib.sha256(shard_size.encode())
    for path in inputs:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def prepare_shards(cfg: DataBenchConfig) -> Path:
    """Preprocess the inputs once into the cache (re-used when the inputs have not changed)."""
    out = Path(cfg.cache_dir) / f"shards-{_inputs_key(cfg.inputs, cfg.shard_size)}"
    preprocess(cfg.inputs, out, workers=1, progress=False, shard_size=cfg.shard_size)
    return out


def measure_raw_decompression(shard_dir: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, raw bytes) to zstd-decompress every shard's frames in order (file bytes pre-read)."""
    blobs = []
    for info in load_manifest(shard_dir).shards:
        data = (shard_dir / info.name).read_bytes()
        index_offset = TRAILER.unpack(data[-TRAILER.size :])[0]
        blobs.append(data[len(SHARD_MAGIC) : index_offset])  # the concatenated zstd frames
    buffer = bytearray(1 << 20)
    total = 0
    clock = Stopwatch()
    for blob in blobs:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
        while n := reader.readinto(buffer):
            total += n
    return clock.wall(), clock.cpu(), total


def measure_stream(shard_dir: Path, seq_len: int, seed: int, samples: int) -> tuple[float, float, int]:
    """(wall s, CPU s, delivered input_ids bytes) for `samples` shuffled windows, from constructing the dataset.

    Reads collated micro-batches of 8 (`batched=True`), the way the trainer reads the stream."""
    micro_batch = 8
    clock = Stopwatch()
    dataset = StreamingByteDataset([str(shard_dir)], seq_len=seq_len, global_batch_size=micro_batch,
                                   micro_batch_size=micro_batch, seed=seed, batched=True)
    delivered = 0
    for batch in itertools.islice(iter(dataset), -(-samples // micro_batch)):
        delivered += batch["input_ids"].numel()
    return clock.wall(), clock.cpu(), delivered


def last_json_line(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON result line in the anchor's output")


def build_synthetic_shard_set(directory: Path, n_shards: int, shard_bytes: int) -> Path:
    """A shard set of n_shards tiny shards (two random documents each), written once and reused."""
    directory = directory / f"synthetic-{n_shards}x{shard_bytes}"
    if (directory / MANIFEST_NAME).is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    infos = []
    for k in range(n_shards):
        docs = [rng.randbytes(shard_bytes // 2) for _ in range(2)]
        infos.append(write_shard(directory / f"shard-{k:06d}.bin", docs))
    save_manifest(directory, make_manifest(infos, {"synthetic": f"{n_shards} shards of {shard_bytes} bytes"}))
    return directory


def first_batch_probe(shard_dir: str, seq_len: int, batch_size: int) -> dict:
    """Run in a fresh process: time and resident memory from constructing the dataset to its first batch."""
    torch.set_num_threads(1)
    gc.collect()
    rss_before = rss_kib("VmRSS")
    clock = Stopwatch()
    dataset = StreamingByteDataset([shard_dir], seq_len=seq_len, global_batch_size=batch_size,
                                   micro_batch_size=batch_size, seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=batch_size, num_workers=0)))
    wall, cpu = clock.wall(), clock.cpu()
    assert batch["input_ids"].shape == (batch_size, seq_len)
    rss_after = rss_kib("VmRSS")
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "added_rss_mb": (rss_after - rss_before) / 1024,
        "added_peak_rss_mb": (peak_rss_kib(rss_before, rss_after) - rss_before) / 1024,
    }


def run(cfg: DataBenchConfig, command: str) -> BenchResults:
    report = BenchResults(name="data", command=command)
    if not cfg.inputs:
        raise ValueError("data benchmark: no inputs; pass --corpus FILE.jsonl.zst (or --corpora DIR)")
    for path in cfg.inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data benchmark: corpus {path} not found; pass existing --corpus files")
    cpu = pin_to_one_core()
    report.notes.append(f"process pinned to CPU {cpu} (os.sched_setaffinity), torch threads 1, "
                        f"OMP_NUM_THREADS=1; subprocesses run on the same CPU")
    report.notes.append("throughput targets are judged on process CPU time (the machine is shared: wall time "
                        "includes other processes' turns); the *_wall figures give the wall-clock rates")
    report.notes.append(f"inputs: {', '.join(Path(p).name for p in cfg.inputs)}; seq_len {cfg.seq_len}; "
                        f"raw decompression and our stream: one untimed warm-up pass each, then {cfg.stream_repeats} "
                        f"interleaved repeats; startup: {cfg.repeats} repeats; medians reported")

    shard_dir = prepare_shards(cfg)
    manifest = load_manifest(shard_dir)
    samples = max(1, manifest.total_bytes // cfg.seq_len)  # about one epoch of windows
    report.notes.append(f"our shard set: {len(manifest.shards)} shards, {manifest.total_bytes:,} raw bytes, "
                        f"{manifest.total_documents} documents; one pass = {samples} windows")

    # one untimed pass of each first: the first pass in a process also pays one-off costs (lazy imports,
    # first-touch page faults of the frame buffers) that a training run pays once, not per epoch
    measure_raw_decompression(shard_dir)
    measure_stream(shard_dir, cfg.seq_len, cfg.seed + cfg.stream_repeats, samples)  # a seed no timed pass uses
    raw, raw_wall, ours, ours_wall = [], [], [], []
    for r in range(cfg.stream_repeats):  # interleaved, so load changes hit both alike
        wall, cpu, nbytes = measure_raw_decompression(shard_dir)
        raw.append(nbytes / cpu)
        raw_wall.append(nbytes / wall)
        wall, cpu, nbytes = measure_stream(shard_dir, cfg.seq_len, cfg.seed + r, samples)
        ours.append(nbytes / cpu)
        ours_wall.append(nbytes / wall)
    how = "sequential zstd decompression of every frame of our shards, file bytes pre-read"
    report.add(figure_from("raw_zstd_decompression", raw, "B/s", f"{how}; CPU time"))
    report.add(figure_from("raw_zstd_decompression_wall", raw_wall, "B/s", f"{how}; wall clock"))
    how = "StreamingByteDataset (micro-batch 8), shuffled windows, input_ids bytes, timed from construction"
    report.add(figure_from("synergy_stream", ours, "B/s", f"{how}; CPU time"))
    report.add(figure_from("synergy_stream_wall", ours_wall, "B/s", f"{how}; wall clock"))

    synthetic = build_synthetic_shard_set(Path(cfg.cache_dir), cfg.startup_shards, cfg.startup_shard_bytes)
    startup_s, startup_cpu, startup_mb, startup_peak_mb = [], [], [], []
    probe_args = ["-c", "import json,sys; from synergy_dist.bench.data import first_batch_probe as p; "
                        "print(json.dumps(p(sys.argv[1], int(sys.argv[2]), 1)))",
                  str(synthetic), str(cfg.seq_len)]
    for _ in range(cfg.repeats):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, *probe_args], capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            report.add(missing("first_batch_seconds", "s", reason))
            break
        result = last_json_line(proc.stdout)
        startup_s.append(result["seconds"])
        startup_cpu.append(result["cpu_seconds"])
        startup_mb.append(result["added_rss_mb"])
        startup_peak_mb.append(result["added_peak_rss_mb"])
    if startup_s:
        how = (f"fresh process, {cfg.startup_shards} shards, construct StreamingByteDataset -> first DataLoader "
               f"batch (1 x {cfg.seq_len}), imports excluded")
        report.add(figure_from("first_batch_seconds", startup_s, "s", f"{how}; wall clock"))
        report.add(figure_from("first_batch_cpu_seconds", startup_cpu, "s", "the same, process CPU time"))
        report.add(figure_from("first_batch_added_rss", startup_mb, "MB", "VmRSS after - before"))
        report.add(figure_from("first_batch_added_peak_rss", startup_peak_mb, "MB", "VmHWM after - VmRSS before"))

    v = report.value
    report.targets += [
        Target("stream vs raw zstd decompression", ratio(v("synergy_stream"), v("raw_zstd_decompression")), ">=", 0.5),
        Target(f"time to first batch, {cfg.startup_shards} shards", v("first_batch_seconds"), "<", 2.0, "s"),
        Target(f"added peak RSS to first batch, {cfg.startup_shards} shards", v("first_batch_added_peak_rss"),
               "<", 100.0, "MB"),
    ]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", action="append", default=None, metavar="FILE",
                        help="jsonl.zst corpus (repeatable); default: pydocs-train + pystdlib-code in --corpora")
    parser.add_argument("--corpora", default=None, metavar="DIR",
                        help="directory of the shared corpora (default: $SYNERGY_CORPORA or ../shared/corpora)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="cache for the benchmark's shard sets, reused across runs "
                             "(default: $SYNERGY_BENCH_CACHE or <tmp>/synergy-bench-cache)")


def default_corpora_dir() -> Path:
    env = os.environ.get("SYNERGY_CORPORA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "corpora"


def config_from_args(args: argparse.Namespace) -> DataBenchConfig:
    if args.corpus:
        inputs = list(args.corpus)
    else:
        corpora = Path(args.corpora) if args.corpora else default_corpora_dir()
        inputs = [str(corpora / name) for name in DEFAULT_CORPORA]
        absent = [p for p in inputs if not Path(p).is_file()]
        if absent:
            raise FileNotFoundError(f"data benchmark: corpus {absent[0]} not found; pass --corpora DIR "
                                    "(holding pydocs-train.jsonl.zst and pystdlib-code.jsonl.zst) or --corpus FILE")
    cache = args.cache or os.environ.get("SYNERGY_BENCH_CACHE") or default_cache_dir()
    cfg = DataBenchConfig(inputs=inputs, cache_dir=cache)
    if args.quick:  # a smoke run of the harness: small windows, few shards, one repeat
        cfg.seq_len, cfg.repeats, cfg.stream_repeats, cfg.startup_shards, cfg.startup_shard_bytes = 1024, 1, 1, 50, 2048
    return cfg
