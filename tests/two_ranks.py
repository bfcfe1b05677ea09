"""Run a test body on 2 real processes joined by a gloo process group, and surface each rank's traceback.

    def body(rank: int, *args): ...        # module level, so that spawn can pickle it
    run_on_two_ranks(body, tmp_path, *args)
"""

from __future__ import annotations

import os
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
    try:
        body(rank, *args)
    except BaseException:
        Path(work_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(body, work_dir: Path, *args) -> None:
    try:
        mp.spawn(_rank_main, args=(body, str(work_dir), args), nprocs=2, join=True)
    except Exception:
        reports = [p.read_text() for p in sorted(Path(work_dir).glob("rank*.txt"))]
        pytest.fail("\n".join(reports) or "a rank died without a report")
