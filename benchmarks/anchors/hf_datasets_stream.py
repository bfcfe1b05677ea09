"""Anchor: Hugging Face `datasets` streaming of jsonl.zst, shuffled, packed into training windows.

usage: python hf_datasets_stream.py --seq-len 8192 --repeats 3 --seed 0 FILE.jsonl.zst [...]
Prints {"bytes_per_s": [...] (wall clock), "cpu_bytes_per_s": [...] (process CPU time), "windows": [...]}
as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pyarrow  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packing import pack_windows  # noqa: E402


def one_epoch(files: list[str], seq_len: int, seed: int, shuffle_buffer: int) -> tuple[int, int, float, float]:
    """(windows, delivered bytes, wall seconds, process CPU seconds) of one shuffled pass."""
    start, cpu_start = time.perf_counter(), time.process_time()
    stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    documents = (row["text"].encode("utf-8") for row in stream)
    windows = 0
    delivered = 0
    for ids in pack_windows(documents, seq_len + 1):
        window = torch.from_numpy(ids)
        sample = {"input_ids": window[:-1], "labels": window[1:]}
        delivered += sample["input_ids"].numel()
        windows += 1
    return windows, delivered, time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="documents in the shuffle buffer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyarrow.set_cpu_count(1)
    pyarrow.set_io_thread_count(1)
    result = {"bytes_per_s": [], "cpu_bytes_per_s": [], "windows": []}
    for repeat in range(args.repeats):
        windows, delivered, wall, cpu = one_epoch(args.files, args.seq_len, args.seed + repeat, args.shuffle_buffer)
        result["bytes_per_s"].append(delivered / wall)
        result["cpu_bytes_per_s"].append(delivered / cpu)
        result["windows"].append(windows)
    result["datasets_version"] = datasets.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
