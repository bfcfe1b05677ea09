"""Run a test body on 2 real processes joined by a gloo process group, and surface each rank's traceback.

    def body(rank: int, *args): ...        # module level, so that spawn can pickle it
    run_on_two_ranks(body, tmp_path, *args)
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT = timedelta(seconds=300)  # generous: the CI machine is shared


def _rank_main(rank: int, body, work_dir: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{work_dir}/rendezvous", rank=rank, world_size=2,
                            timeout=GLOO_TIMEOUT)
    status = 0
    try:
        body(rank, *args)
        dist.barrier()
    except BaseException:
        Path(work_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        status = 1
    # Leave without the interpreter's teardown: on a loaded machine it sometimes aborts in a leftover
    # C++ thread of the gloo/DeepSpeed stack ("terminate called without an active exception") after
    # the body has passed, which would fail the test for nothing (synergy-train does the same).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_on_two_ranks(body, work_dir: Path, *args) -> None:
    try:
        mp.spawn(_rank_main, args=(body, str(work_dir), args), nprocs=2, join=True)
    except Exception:
        reports = [p.read_text() for p in sorted(Path(work_dir).glob("rank*.txt"))]
        pytest.fail("\n".join(reports) or "a rank died without a report")
