"""Shared test settings: one thread per process (the CI machine has 2 cores and tests spawn 2 ranks); no
run a test started outlives it."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
import train_launch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _end_runs_left_running():
    """A test that fails while its run is alive (a stalled rank, a missed step) must not leave the run behind
    to hold CPU and /dev/shm for the rest of the suite."""
    yield
    train_launch.end_started_runs()
