"""Measurement conditions shared by the benchmarks: one pinned core, and two clocks."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch


def pin_to_one_core() -> int:
    """Restrict this process (and the subprocesses it starts) to one CPU, one thread; returns the CPU id."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    return cpus[-1]


class Stopwatch:
    """Wall-clock and process CPU time since construction.

    The machine is shared, so wall time includes waiting for other processes' turns; the CPU time
    of a process pinned to one core is the work itself. Benchmarks report both and judge
    throughput targets on CPU time (stated in every report).
    """

    def __init__(self) -> None:
        self.wall_start = time.perf_counter()
        self.cpu_start = time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.wall_start

    def cpu(self) -> float:
        return time.process_time() - self.cpu_start


def rss_kib(field_name: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status, in KiB: "VmRSS" (now) or "VmHWM" (peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def peak_rss_kib(*seen_kib: float) -> float:
    """This process's peak RSS so far, in KiB: VmHWM, but never below a reading already taken.

    VmHWM alone is not monotone: Linux sums its per-CPU RSS counters approximately and folds the current RSS
    into the high-water mark only at some points, so a later VmHWM can read a few hundred KiB below an earlier
    VmRSS or VmHWM (seen in CI: 660.03 MiB after 660.25 MiB). Pass the earlier readings of the same run."""
    return max(rss_kib("VmHWM"), *seen_kib)


@contextlib.contextmanager
def restored_affinity() -> Iterator[None]:
    """Give the CPUs this process may use back after a benchmark that pinned it to one core
    (the next benchmark, e.g. 2-rank training, may need them all)."""
    cpus = os.sched_getaffinity(0)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
