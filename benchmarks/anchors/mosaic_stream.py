"""Anchor: MosaicML `streaming` (MDS shards, zstd, shuffle on) delivering packed training windows.

Runs in its own venv (streaming needs torchvision). Standalone: imports nothing from synergy_dist.
usage: python mosaic_stream.py --work DIR --seq-len 8192 --repeats 3 FILE.jsonl.zst [...]

Setup (not timed): the corpus is packed into windows of seq_len + 1 ids (documents joined with
EOD, as llm-foundry's concat-tokens conversion does) and written once as zstd-compressed MDS
shards with a uint16 ndarray column. Timed, per repeat: a StreamingDataset over those shards with
shuffle on and a fresh local cache, iterated for one epoch ("cold": includes copying and
decompressing every shard, the same work our stream does from zstd frames), then a second epoch
over the already-decompressed local shards ("warm": no decompression left).
Prints {"cold_bytes_per_s": [...], "warm_bytes_per_s": [...] (wall clock), "cold_cpu_bytes_per_s": [...],
"warm_cpu_bytes_per_s": [...] (process CPU time, all threads), ...} as the last stdout line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import streaming  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402
from streaming import MDSWriter, StreamingDataset  # noqa: E402
from streaming.base.util import clean_stale_shared_memory  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packing import pack_windows  # noqa: E402


def read_jsonl_zst(path: str):
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in text:
            if line.strip():
                yield json.loads(line)["text"].encode("utf-8")


def convert(files: list[str], out: str, window: int, size_limit: int) -> int:
    """Write the packed windows as MDS once; reuse them when the same settings were written before."""
    marker = os.path.join(out, "settings.json")
    settings = {"files": files, "window": window, "size_limit": size_limit}
    if os.path.exists(marker) and json.load(open(marker)) == settings:
        return json.load(open(os.path.join(out, "index.json")))["shards"].__len__()
    shutil.rmtree(out, ignore_errors=True)
    documents = (doc for path in files for doc in read_jsonl_zst(path))
    columns = {"tokens": f"ndarray:uint16:{window}"}
    with MDSWriter(out=out, columns=columns, compression="zstd", size_limit=size_limit) as writer:
        for ids in pack_windows(documents, window):
            writer.write({"tokens": ids.astype(np.uint16)})
    json.dump(settings, open(marker, "w"))
    return len(json.load(open(os.path.join(out, "index.json")))["shards"])


def iterate(dataset: StreamingDataset) -> tuple[int, float, float]:
    """(delivered bytes, wall seconds, process CPU seconds, all threads) of one epoch."""
    start, cpu_start = time.perf_counter(), time.process_time()
    delivered = 0
    for sample in dataset:
        window = torch.from_numpy(sample["tokens"].astype(np.int64))
        batch = {"input_ids": window[:-1], "labels": window[1:]}
        delivered += batch["input_ids"].numel()
    return delivered, time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--work", required=True, help="directory for the MDS shards and local caches")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size-limit", type=int, default=1 << 24, help="raw MDS shard size in bytes")
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch (same as our micro-batch)")
    parser.add_argument("--predownload", type=int, default=1 << 20,
                        help="samples prepared ahead; the default covers a whole epoch (measured fastest: "
                             "the library default of 8 x batch_size starves a single core)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mds_dir = os.path.join(args.work, "mds")
    num_shards = convert(args.files, mds_dir, args.seq_len + 1, args.size_limit)
    result = {"cold_bytes_per_s": [], "warm_bytes_per_s": [], "cold_cpu_bytes_per_s": [], "warm_cpu_bytes_per_s": [],
              "delivered_bytes": [], "num_shards": num_shards,
              "streaming_version": streaming.__version__, "batch_size": args.batch_size,
              "predownload": args.predownload}
    for repeat in range(args.repeats):
        clean_stale_shared_memory()
        local = os.path.join(args.work, f"local-{repeat}")
        shutil.rmtree(local, ignore_errors=True)
        dataset = StreamingDataset(remote=mds_dir, local=local, shuffle=True, shuffle_seed=args.seed + repeat,
                                   batch_size=args.batch_size, predownload=args.predownload)
        delivered, cold_wall, cold_cpu = iterate(dataset)
        delivered_warm, warm_wall, warm_cpu = iterate(dataset)
        result["cold_bytes_per_s"].append(delivered / cold_wall)
        result["warm_bytes_per_s"].append(delivered_warm / warm_wall)
        result["cold_cpu_bytes_per_s"].append(delivered / cold_cpu)
        result["warm_cpu_bytes_per_s"].append(delivered_warm / warm_cpu)
        result["delivered_bytes"].append(delivered)
        del dataset
        shutil.rmtree(local, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
