"""No hangs: a rank killed with SIGKILL ends the whole 2-rank run (torchrun and the `deepspeed` launcher) within
a bound, and a restart resumes with the losses of an uninterrupted run; a hung step trips the watchdog on every
rank (stacks in the log, exit status 76); the watchdog's step limit; the collective timeout reaches the process
group. The srun variants are in tests/test_slurm.py."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import train_launch as tl

from synergy_dist.config import ConfigError, TrainConfig, load_config
from synergy_dist.train.watchdog import MEDIAN_WINDOW, StepLimit, step_limit

STEPS = 6
# A launcher ends its other ranks at most ~30 s after the first one fails (torchrun's and the deepspeed
# launcher's grace between SIGTERM and SIGKILL); without that, the stalled rank would wait HANG_LIMIT_S (600 s).
END_BOUND_S = 60


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample_shards")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hangs")


def config(workdir: Path, sample_dir: Path, name: str, **sections) -> dict:
    sections["train"] = {"max_steps": STEPS, "lr": 3e-3, "sample_bytes": 0, **sections.get("train", {})}
    return tl.tiny_config(workdir / name, sample_dir, **sections)


@pytest.fixture(scope="module")
def reference(workdir, sample_dir) -> dict:
    cfg = config(workdir, sample_dir, "reference_2ranks")
    assert tl.run(cfg, "torchrun", 2) == 0, tl.output_of(cfg)[-4000:]
    return cfg


def pid_of_rank(proc: subprocess.Popen, rank: int) -> int:
    """The training process of `rank` under the launcher (the launchers set RANK in each rank's environment)."""
    for pid in tl.rank_pids(proc):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process of rank {rank} under {proc.pid}")


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_ended(proc: subprocess.Popen, cfg: dict, bound: float) -> int:
    try:
        return proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        tl.kill_group(proc)
        pytest.fail(f"the run did not end within {bound} s:\n{tl.output_of(cfg)[-4000:]}")


@pytest.mark.slow
# torchrun reports a failed rank as 1. The deepspeed launcher exits with the status of whichever failed rank its
# poll finds first: the killed rank (-9, so 247) or the survivor, whose all-reduce failed (1); both are a failure.
@pytest.mark.parametrize("launcher,statuses", [("torchrun", {1}), ("deepspeed", {256 - signal.SIGKILL, 1})])
def test_a_killed_rank_ends_the_run_and_a_restart_resumes_exactly(workdir, sample_dir, reference, launcher, statuses):
    # Rank 1 stalls inside step 4, so rank 0 waits for it in that step's gradient all-reduce; then rank 1 dies.
    cfg = config(workdir, sample_dir, f"killed_rank_{launcher}", debug={"stall_batches": [4], "stall_rank": 1})
    proc = tl.start(cfg, launcher, 2)
    tl.wait_for_step(proc, cfg, 3)
    survivor, victim = pid_of_rank(proc, 0), pid_of_rank(proc, 1)
    os.kill(victim, signal.SIGKILL)
    assert wait_ended(proc, cfg, END_BOUND_S) in statuses, tl.output_of(cfg)[-4000:]
    assert not running(survivor)
    # the survivor did not wait: its all-reduce failed at once (gloo's message varies with the moment of the kill),
    # or, when the launcher noticed the dead rank first, the launcher ended it
    out = tl.output_of(cfg)
    assert (re.search(r"\[rank0\]: RuntimeError: .*Connection (closed|reset) by peer", out)
            or re.search(r"Sending process \d+ closing signal SIGTERM|Killing subprocess \d+", out)), out[-4000:]
    assert max(tl.losses_by_step(cfg)) == 3
    if launcher != "torchrun":
        return  # resuming does not depend on the launcher (test_train_runs.py resumes under both)

    cfg.pop("debug")  # the restart, on the same run directory
    assert tl.run(cfg, launcher, 2) == 0, tl.output_of(cfg)[-4000:]
    assert f"resumed from {Path(cfg['run']['dir']) / 'checkpoints' / 'step_00000002'} at step 2" in tl.output_of(cfg)
    assert tl.losses_by_step(cfg) == tl.losses_by_step(reference)  # bitwise: floats compare exactly


@pytest.mark.slow
def test_a_hung_step_trips_the_watchdog_on_every_rank(workdir, sample_dir):
    # Every rank stalls inside step 4; steps take milliseconds here, so the limit is watchdog_min_s.
    cfg = config(workdir, sample_dir, "watchdog",
                 train={"watchdog_factor": 5.0, "watchdog_warmup_steps": 2, "watchdog_min_s": 3.0},
                 debug={"stall_batches": [4]})
    proc = tl.start(cfg, "deepspeed", 2)
    tl.wait_for_step(proc, cfg, 3)
    status = wait_ended(proc, cfg, END_BOUND_S)
    out = tl.output_of(cfg)
    assert status == 76, out[-4000:]  # the deepspeed launcher exits with its first failed rank's status
    for rank in (0, 1):
        assert (f"synergy-train: watchdog: step 4 on rank {rank} has run 3." in out
                and "s, past its limit of 3.0 s (train.watchdog_min_s=3); stack traces of every thread follow; "
                    "exiting with 76" in out), out[-4000:]
    # faulthandler's dump of each rank: the stalled main thread (in the step) and the watchdog thread itself.
    stalled = f'File "{tl.REPO / "synergy_dist" / "train" / "fault_injection.py"}", line '
    assert out.count(stalled) == 2 and out.count(" in train_step\n") == 2, out[-4000:]
    assert out.count("(most recent call first):\n") >= 4, out[-4000:]
    assert "watchdog: step 4 on rank 0" in (Path(cfg["run"]["dir"]) / "events.log").read_text()


def test_step_limit_is_absolute_until_warm_then_also_relative_to_the_median():
    cfg = TrainConfig(watchdog_s=100.0, watchdog_factor=10.0, watchdog_warmup_steps=3, watchdog_min_s=5.0)
    assert step_limit(cfg, []) == StepLimit(100.0, "train.watchdog_s=100")
    assert step_limit(cfg, [50.0, 50.0]).seconds == 100.0  # slow first steps: only the absolute limit
    assert step_limit(cfg, [1.0, 2.0, 30.0]) == StepLimit(20.0, "train.watchdog_factor=10 x median step 2 s")
    assert step_limit(cfg, [0.01] * 3) == StepLimit(5.0, "train.watchdog_min_s=5")  # never below the floor
    assert step_limit(cfg, [20.0] * 3).seconds == 100.0  # the smaller of the two applies
    recent = [90.0] * 50 + [1.0] * MEDIAN_WINDOW  # the median is over the last MEDIAN_WINDOW steps only
    assert step_limit(cfg, recent).seconds == 10.0
    assert step_limit(TrainConfig(watchdog_s=0.0, watchdog_factor=0.0), [1.0] * 50).seconds == math.inf
    assert step_limit(TrainConfig(watchdog_s=0.0, watchdog_factor=2.0, watchdog_warmup_steps=1,
                                  watchdog_min_s=0.0), [3.0]).seconds == 6.0


def test_bad_watchdog_and_timeout_values_are_one_clear_line():
    with pytest.raises(ConfigError, match=r"^distributed.timeout_s=0.0 must be > 0 \(seconds, e.g. "
                                          r"distributed.timeout_s=600\)$"):
        load_config(None, ["distributed.timeout_s=0"])
    with pytest.raises(ConfigError, match=r"^train.watchdog_s, train.watchdog_factor and train.watchdog_min_s must "
                                          r"be >= 0 \(0 = off\) and train.watchdog_warmup_steps >= 1$"):
        load_config(None, ["train.watchdog_factor=-1"])


def test_distributed_timeout_is_the_process_groups_collective_timeout():
    code = ("import torch, torch.distributed as dist\n"
            "from synergy_dist.train.distributed import detect_env, init_distributed\n"
            "init_distributed(detect_env(), 7.5)\n"
            "print(dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu')).options._timeout)\n")
    out = subprocess.run([sys.executable, "-c", code], env=tl.child_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.splitlines()[-1] == "0:00:07.500000", out.stderr[-2000:]


def test_the_stall_fault_stalls_only_its_rank_and_batch(monkeypatch):
    import torch

    from synergy_dist.config import DebugConfig
    from synergy_dist.train import fault_injection

    slept = []
    monkeypatch.setattr(fault_injection.time, "sleep", slept.append)
    x = torch.tensor(1.0)
    for rank in (0, 1):
        faults = fault_injection.FaultInjector(DebugConfig(stall_batches=[4], stall_rank=1, step_sleep_s=0.5), rank)
        assert faults.on_loss(x, 3) is x and faults.on_loss(x, 4) is x
        faults.after_step(4, signalled=lambda: True)
    assert slept == [0.5, fault_injection.HANG_LIMIT_S, 0.5]
    fault_injection.FaultInjector(DebugConfig()).after_step(1, signalled=lambda: False)
    assert slept == [0.5, fault_injection.HANG_LIMIT_S, 0.5]  # the defaults sleep nowhere
