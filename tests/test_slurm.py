"""slurm/pretrain.sh and slurm/preprocess.sh driven through a real local SLURM (tests/slurm/local_cluster.sh).

The jobs run the real trainer (configs/tiny-cpu.yaml, 2 tasks, gloo) and the real data pipeline.
SLURM is started once for this module and stopped afterwards when this module started it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "tests" / "slurm" / "local_cluster.sh"
VENV_BIN = Path(sys.executable).parent


def slurm_unavailable_reason() -> str | None:
    """Why a local SLURM cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "local SLURM needs root (tests/slurm/local_cluster.sh installs packages and starts daemons)"
    have_slurm = all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    return None


def start_cluster() -> bool:
    """Start the local cluster; return True when this call started it (so the caller stops it)."""
    if subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0:
        return False
    result = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"tests/slurm/local_cluster.sh start failed:\n{result.stdout}\n{result.stderr}")
    return True


def stop_cluster() -> None:
    subprocess.run([str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)


def job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch exports into a job: this virtualenv first on PATH, one thread per rank."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Jobs:
    """Submits jobs and cancels whatever is still queued at teardown, so no test leaves jobs behind."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> str:
        result = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        job_id = result.stdout.strip().split(";")[0]
        self.ids.append(job_id)
        return job_id

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True)


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once SLURM forgot the job."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    info = {}
    for item in result.stdout.split():
        key, _, value = item.partition("=")
        info.setdefault(key, value)
    return info


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_finished(job_id: str, timeout: float) -> dict[str, str]:
    """Wait until the job is in a final state. A requeued job (PENDING on BeginTime) is not final."""
    return wait_for(lambda: (lambda i: i if i.get("JobState") in FINISHED else None)(job_info(job_id)),
                    timeout, f"job {job_id} to finish")


def release_requeued(job_id: str, timeout: float, *updates: str) -> dict[str, str]:
    """SLURM holds a requeued job ~2 minutes (BeginTime); let it start in a few seconds instead, with
    `updates` (e.g. "TimeLimit=15") applied to it as well.

    Not at once: slurmd revokes the old instance's credential when the requeue kills it, with a
    timestamp in whole seconds, and refuses a new credential created in that same second ("Killing
    non-startable batch JobId=N: Job credential revoked"; the job then ends FAILED). That hold is what
    SLURM's BeginTime is for; a few seconds are enough here."""
    def requeued() -> dict[str, str] | None:
        i = job_info(job_id)
        return i if i.get("JobState") == "PENDING" and int(i.get("Restarts", 0)) >= 1 else None

    info = wait_for(requeued, timeout, f"job {job_id} to be requeued")
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now", *updates], check=True,
                   capture_output=True)
    return info


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def last_step(run_dir: Path) -> int:
    rows = read_metrics(run_dir)
    return rows[-1]["step"] if rows else 0


pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PRETRAIN = REPO / "slurm" / "pretrain.sh"
PREPROCESS = REPO / "slurm" / "preprocess.sh"
TINY = REPO / "configs" / "tiny-cpu.yaml"
# Two CPU ranks on the one 2-CPU node: the CPU variant of the template.
CPU_TWO_TASKS = ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:15:00"]
# Tiny and quick: no evaluation, no sample generation, a micro-batch that divides over 2 ranks.
QUICK = ["log.every_steps=1", "train.eval_every_steps=0", "train.sample_bytes=0", "batch.micro_batch_size=4"]
JOB_TIMEOUT = 300


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    started = start_cluster()
    yield
    if started:
        stop_cluster()


@pytest.fixture
def jobs(slurm_cluster):
    tracker = Jobs()
    yield tracker
    tracker.cancel_all()


def submit_pretrain(jobs: Jobs, tmp_path: Path, overrides: list[str], **env: str) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    job_id = jobs.sbatch([*CPU_TWO_TASKS, f"--output={tmp_path}/slurm-%j.out", str(PRETRAIN), *QUICK, *overrides],
                         job_env(CONFIG=str(TINY), RUN_DIR=str(run_dir), **env), cwd=tmp_path)
    return job_id, run_dir


def job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "logs" / f"slurm-{job_id}.log").read_text()


def signal_batch_shell(job_id: str, run_dir: Path, after_step: int) -> int:
    """Once training is under way, send what SLURM sends before the time limit (USR1 to the batch shell)."""
    wait_for(lambda: last_step(run_dir) >= after_step, JOB_TIMEOUT, f"step {after_step} in {run_dir}/metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, capture_output=True)
    return last_step(run_dir)


def test_local_cluster_runs_a_two_task_batch_job(jobs, tmp_path):
    job_id = jobs.sbatch(["--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/trivial-%j.out",
                          "--wrap", "srun bash -c 'echo rank=$SLURM_PROCID of=$SLURM_NTASKS'"], job_env(), cwd=tmp_path)
    info = wait_finished(job_id, 60)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
    lines = sorted((tmp_path / f"trivial-{job_id}.out").read_text().splitlines())
    assert lines == ["rank=0 of=2", "rank=1 of=2"]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory) -> tuple[str, Path, dict[str, str]]:
    """A 6-step job run once for the module: (job id, run dir, final scontrol info)."""
    tracker = Jobs()
    try:
        job_id, run_dir = submit_pretrain(tracker, tmp_path_factory.mktemp("uninterrupted"),
                                          ["train.max_steps=6", "checkpoint.every_steps=3"])
        yield job_id, run_dir, wait_finished(job_id, JOB_TIMEOUT)
    finally:
        tracker.cancel_all()


def test_pretrain_cpu_two_tasks_trains_checkpoints_and_exits_0(uninterrupted):
    job_id, run_dir, info = uninterrupted
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {r["world_size"] for r in rows} == {2}
    assert all(r["bpb"] > 0 for r in rows)
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()
    assert "launcher=srun" in log and "1 node(s) x 2 process(es)" in log
    assert "training finished (exit 0)" in log


def test_pretrain_usr1_checkpoints_requeues_and_finishes_without_repeating_steps(jobs, tmp_path):
    total = 20
    # checkpoint.every_steps=0: the only checkpoint before the end is the one the signal causes.
    job_id, run_dir = submit_pretrain(jobs, tmp_path, [f"train.max_steps={total}", "checkpoint.every_steps=0"])
    signalled_at = signal_batch_shell(job_id, run_dir, after_step=2)
    release_requeued(job_id, JOB_TIMEOUT)
    steps_before_requeue = last_step(run_dir)
    info = wait_finished(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert signalled_at <= steps_before_requeue < total, "the first attempt must stop early, on the signal"
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, total + 1)), "every step trained exactly once across the requeue"
    assert {r["world_size"] for r in read_metrics(run_dir)} == {2}
    assert "got SIGUSR1" in log
    assert f"trainer checkpointed (exit 75); requeueing job {job_id} (restart 1 of at most 20)" in log
    assert "attempt 2" in log and "training finished (exit 0)" in log


def test_pretrain_deepspeed_launcher_stops_requeueing_at_max_restarts(jobs, tmp_path):
    total = 40
    job_id, run_dir = submit_pretrain(jobs, tmp_path, [f"train.max_steps={total}", "checkpoint.every_steps=0"],
                                      LAUNCHER="deepspeed", MAX_RESTARTS="0")
    signal_batch_shell(job_id, run_dir, after_step=2)
    info = wait_finished(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), log
    assert "launcher=deepspeed" in log
    assert "already requeued 0 times (MAX_RESTARTS=0); not requeueing" in log
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < total
    assert {r["world_size"] for r in read_metrics(run_dir)} == {2}
    # The signal's checkpoint is complete and names the last logged step: resubmitting resumes there.
    assert (run_dir / "checkpoints" / f"step_{steps[-1]:08d}").is_dir()


def test_pretrain_real_time_limit_signals_checkpoints_requeues_and_finishes(jobs, tmp_path):
    """SLURM itself sends USR1 60 s before a 2-minute limit (up to a minute early: its timer runs every 30 s);
    no scancel here. The run is slowed to ~1 s a step so that it is still training then."""
    total = 60
    job_id = jobs.sbatch(["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=2",
                          "--signal=B:USR1@60", f"--output={tmp_path}/slurm-%j.out", str(PRETRAIN), *QUICK,
                          f"train.max_steps={total}", "checkpoint.every_steps=0", "debug.step_sleep_s=1.0"],
                         job_env(CONFIG=str(TINY), RUN_DIR=str(tmp_path / "run")), cwd=tmp_path)
    run_dir = tmp_path / "run"
    # The requeued attempt gets a longer limit, so that it finishes instead of meeting the signal again.
    release_requeued(job_id, 180, "TimeLimit=15")
    steps_before_requeue = last_step(run_dir)
    info = wait_finished(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert 0 < steps_before_requeue < total, "the first attempt must stop early, on SLURM's signal"
    assert "got SIGUSR1" in log and "got SIGTERM" not in log  # the warning signal, not the time limit's kill
    assert f"trainer checkpointed (exit 75); requeueing job {job_id} (restart 1 of at most 20)" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{steps_before_requeue:08d}'}" in log
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, total + 1)), "every step trained exactly once across the requeue"


def rank_pid(job_id: str, rank: int) -> int:
    """The trainer process of `rank` in the job (srun sets SLURM_JOB_ID and SLURM_PROCID in its environment)."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ and any(a.endswith(b"synergy-train") for a in argv[:2]):
            return int(proc.name)
    raise AssertionError(f"no synergy-train process of rank {rank} in job {job_id}")


def test_pretrain_killed_rank_ends_the_job_and_a_resubmit_resumes_exactly(jobs, tmp_path, uninterrupted):
    # Rank 1 stalls inside step 5, so rank 0 waits for it in that step's all-reduce; then rank 1 is killed.
    overrides = ["train.max_steps=6", "checkpoint.every_steps=3"]
    job_id, run_dir = submit_pretrain(jobs, tmp_path, [*overrides, "debug.stall_batches=[5]", "debug.stall_rank=1"])
    wait_for(lambda: last_step(run_dir) >= 4, JOB_TIMEOUT, f"step 4 in {run_dir}/metrics.jsonl")
    os.kill(rank_pid(job_id, 1), signal.SIGKILL)
    # The other rank's collective fails at once (gloo); srun's --wait (TASK_EXIT_WAIT, 60 s) bounds it anyway.
    info = wait_finished(job_id, 90)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log
    assert f"trainer failed with exit {info['ExitCode'].split(':')[0]}; not requeueing" in log
    assert last_step(run_dir) == 4

    again, _ = submit_pretrain(jobs, tmp_path, overrides)  # the same RUN_DIR: resume
    info = wait_finished(again, JOB_TIMEOUT)
    log = job_log(run_dir, again)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} at step 3" in log
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir)}  # the resumed run's, for steps 4-6
    reference = {r["step"]: r["loss"] for r in read_metrics(uninterrupted[1])}
    assert losses == reference  # bitwise: floats compare exactly


def test_pretrain_scancel_checkpoints_but_is_not_requeued(jobs, tmp_path):
    total = 40
    job_id, run_dir = submit_pretrain(jobs, tmp_path, [f"train.max_steps={total}", "checkpoint.every_steps=0"])
    wait_for(lambda: last_step(run_dir) >= 2, JOB_TIMEOUT, f"step 2 in {run_dir}/metrics.jsonl")
    # scancel sends SIGTERM to the batch shell and every rank: a user's cancel must stay a cancel.
    subprocess.run(["scancel", job_id], check=True, capture_output=True)
    info = wait_finished(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
    assert "got SIGTERM" in log
    assert "trainer checkpointed on SIGTERM (scancel or preemption); not requeueing from here" in log
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < total
    assert (run_dir / "checkpoints" / f"step_{steps[-1]:08d}").is_dir()


def test_pretrain_crash_is_not_requeued(jobs, tmp_path):
    # 8 sequences cannot be split into micro-batches of 8 over 2 ranks: the trainer exits 2 at start.
    job_id, run_dir = submit_pretrain(jobs, tmp_path, ["train.max_steps=4", "batch.micro_batch_size=8"])
    info = wait_finished(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert "batch.global_batch_size=8 is not divisible by world size 2" in log
    assert "trainer failed with exit 2; not requeueing" in log


def test_pretrain_rejects_a_missing_config(jobs, tmp_path):
    job_id = jobs.sbatch([*CPU_TWO_TASKS, f"--output={tmp_path}/slurm-%j.out", str(PRETRAIN)],
                         job_env(CONFIG=str(tmp_path / "nope.yaml"), RUN_DIR=str(tmp_path / "run")), cwd=tmp_path)
    info = wait_finished(job_id, JOB_TIMEOUT)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    out = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert f"CONFIG={tmp_path / 'nope.yaml'} does not exist" in out


def write_corpus_files(directory: Path, n_files: int, docs_per_file: int) -> list[Path]:
    """Slices of the bundled sample corpus as separate jsonl inputs."""
    import zstandard

    from synergy_dist import SAMPLE_CORPUS

    with open(SAMPLE_CORPUS, "rb") as f:
        lines = zstandard.ZstdDecompressor().stream_reader(f).read().decode().splitlines()
    assert len(lines) >= n_files * docs_per_file
    paths = []
    for i in range(n_files):
        path = directory / f"part-{i}.jsonl"
        path.write_text("\n".join(lines[i * docs_per_file:(i + 1) * docs_per_file]) + "\n")
        paths.append(path)
    return paths


def submit_preprocess_array(jobs: Jobs, tmp_path: Path, inputs: Path, extra_args: str) -> tuple[str, str]:
    """Submit a 2-task array; return (array job id, merge job id submitted by its first task)."""
    env = job_env(INPUTS=f"{inputs}/part-*.jsonl", OUTPUT=str(tmp_path / "merged"), PREPROCESS_ARGS=extra_args)
    array_id = jobs.sbatch(["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/pre-%A_%a.out", str(PREPROCESS)],
                           env, cwd=tmp_path)
    merge_id_file = tmp_path / "merged.parts" / "merge-job-id"
    merge_id = wait_for(lambda: merge_id_file.exists() and merge_id_file.read_text().strip(), JOB_TIMEOUT,
                        "the array's first task to submit the merge job")
    jobs.ids.append(merge_id)
    return array_id, merge_id


@pytest.mark.parametrize("valid_fraction", [0.0, 0.2])
def test_preprocess_array_merges_to_the_same_documents_as_one_process(jobs, tmp_path, valid_fraction):
    from data_pipeline.shards import iter_shard_documents, load_manifest, verify_shard_set

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_corpus_files(inputs, n_files=5, docs_per_file=16)
    args = f"--shard-size 64KiB --valid-fraction {valid_fraction}"
    array_id, merge_id = submit_preprocess_array(jobs, tmp_path, inputs, args)
    merge_info = wait_finished(merge_id, JOB_TIMEOUT)
    task_infos = [wait_finished(f"{array_id}_{task}", JOB_TIMEOUT) for task in (0, 1)]
    assert [(t["JobState"], t["ExitCode"]) for t in task_infos] == [("COMPLETED", "0:0")] * 2
    assert (merge_info["JobState"], merge_info["ExitCode"]) == ("COMPLETED", "0:0")
    # afterok: the merge started only once both array tasks had ended (ISO times compare as strings).
    assert merge_info["StartTime"] >= max(t["EndTime"] for t in task_infos)

    single = tmp_path / "single"
    subprocess.run([str(VENV_BIN / "synergy-preprocess"), "--quiet", *args.split(), "--output", str(single),
                    f"{inputs}/part-*.jsonl"], check=True, env=job_env())
    # The layout one process writes: the set itself, or train/ + valid/ with a validation split.
    splits = ["train", "valid"] if valid_fraction > 0 else [""]
    parts = sorted((tmp_path / "merged.parts").glob("part-*"))
    assert [p.name for p in parts] == ["part-00000", "part-00001"]
    # Each task wrote its own shard set over its slice: files 0-1 (32 documents) and 2-4 (48).
    assert [sum(load_manifest(p / split).total_documents for split in splits) for p in parts] == [32, 48]
    total = 0
    for split in splits:
        merged = tmp_path / "merged" / split
        assert verify_shard_set(merged) == []
        merged_docs = list(iter_shard_documents(merged))
        assert merged_docs == list(iter_shard_documents(single / split))
        total += len(merged_docs)
    assert total == 80
    if valid_fraction > 0:
        assert 0 < load_manifest(tmp_path / "merged" / "valid").total_documents < 40


def test_preprocess_failed_task_cancels_the_merge(jobs, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_corpus_files(inputs, n_files=4, docs_per_file=10)
    (inputs / "part-3.jsonl").write_text('{"text": "fine"}\nthis line is not JSON\n')
    array_id, merge_id = submit_preprocess_array(jobs, tmp_path, inputs, "--shard-size 64KiB")
    task_infos = [wait_finished(f"{array_id}_{task}", JOB_TIMEOUT) for task in (0, 1)]
    assert [t["JobState"] for t in task_infos] == ["COMPLETED", "FAILED"]
    # --kill-on-invalid-dep: the merge job is cancelled instead of waiting forever on afterok.
    merge_info = wait_finished(merge_id, 60)
    assert merge_info["JobState"] == "CANCELLED"
    assert not (tmp_path / "merged").exists()
