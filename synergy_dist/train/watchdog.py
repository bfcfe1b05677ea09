"""The step watchdog: a training step that runs far longer than usual is a hang (a stuck collective, a
stalled file system). The watchdog then writes the stack of every thread of the process to stderr
(faulthandler), and the process exits with WATCHDOG_EXIT_CODE (76), which slurm/pretrain.sh requeues.

    with Watchdog(cfg.train, rank, note=metrics.event if is_main else None) as watchdog:
        for each step:
            with watchdog.step(step):
                train_step()

A step's limit is `train.watchdog_s`, and after `train.watchdog_warmup_steps` steps also
max(`train.watchdog_factor` x the median of the last MEDIAN_WINDOW steps, `train.watchdog_min_s`);
the smaller applies. Only what runs inside `step()` is timed: checkpoint saves and evaluations are not,
so they never trip it (a rank stuck there is ended by the other ranks' collective timeout,
`distributed.timeout_s`, and the launcher).

The watchdog is a Python thread: it needs the GIL, which blocking calls of torch, gloo, NCCL and file
I/O release while they wait.
"""

from __future__ import annotations

import faulthandler
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

from synergy_dist.config import TrainConfig
from synergy_dist.train.distributed import WATCHDOG_EXIT_CODE

MEDIAN_WINDOW = 100  # the "usual" step is the median of this many recent steps
POLL_S = 0.25  # how often the watchdog thread looks at the clock


@dataclass(frozen=True)
class StepLimit:
    seconds: float  # math.inf: no limit
    why: str  # the keys that set it, for the message


def step_limit(cfg: TrainConfig, durations: Sequence[float]) -> StepLimit:
    """How long the next step may take, given the durations (seconds) of the steps before it."""
    limits = [StepLimit(cfg.watchdog_s, f"train.watchdog_s={cfg.watchdog_s:g}")] if cfg.watchdog_s else []
    if cfg.watchdog_factor and len(durations) >= cfg.watchdog_warmup_steps:
        median = statistics.median(durations[-MEDIAN_WINDOW:])
        relative = cfg.watchdog_factor * median
        if relative >= cfg.watchdog_min_s:
            limits.append(StepLimit(relative, f"train.watchdog_factor={cfg.watchdog_factor:g} x median step "
                                              f"{median:.3g} s"))
        else:
            limits.append(StepLimit(cfg.watchdog_min_s, f"train.watchdog_min_s={cfg.watchdog_min_s:g}"))
    return min(limits, key=lambda limit: limit.seconds, default=StepLimit(math.inf, "no limit"))


class Watchdog:
    """Times each step in a background thread. Past its limit: the one-line message to `note` (which prints it,
    e.g. MetricsLogger.event: stderr and events.log) or else to `stream`, every thread's stack to `stream`,
    then exit 76."""

    def __init__(self, cfg: TrainConfig, rank: int, note: Callable[[str], None] | None = None,
                 stream: TextIO | None = None):
        self.cfg, self.rank, self.note = cfg, rank, note
        self.stream = stream or sys.stderr
        self.durations: list[float] = []
        self._armed: tuple[int, float, StepLimit] | None = None  # (step, monotonic start, limit)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="synergy-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.cfg.watchdog_s or self.cfg.watchdog_factor:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Time the block as training step `step`; its duration joins the history when it returns."""
        limit = step_limit(self.cfg, self.durations)
        started = time.monotonic()
        with self._lock:
            self._armed = (step, started, limit)
        try:
            yield
        finally:
            with self._lock:
                self._armed = None
        self.durations.append(time.monotonic() - started)
        del self.durations[:-MEDIAN_WINDOW]

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                armed = self._armed
            if armed is not None and time.monotonic() - armed[1] > armed[2].seconds:
                self._trip(*armed)

    def _trip(self, step: int, started: float, limit: StepLimit) -> None:
        message = (f"synergy-train: watchdog: step {step} on rank {self.rank} has run "
                   f"{time.monotonic() - started:.1f} s, past its limit of {limit.seconds:.1f} s ({limit.why}); "
                   f"stack traces of every thread follow; exiting with {WATCHDOG_EXIT_CODE}")
        try:
            if self.note is not None:
                self.note(message)
            else:
                print(message, file=self.stream, flush=True)
            faulthandler.dump_traceback(file=self.stream, all_threads=True)
            self.stream.flush()
        finally:
            os._exit(WATCHDOG_EXIT_CODE)  # the main thread is stuck: no clean shutdown is possible
