"""Checkpoints load without running code and save durably.

- A planted pickle (a .pt file whose unpickling would create a file) in a real checkpoint is refused by
  synergy-eval, synergy-generate, synergy-export, synergy-report and by resume, with one line naming the
  file, and its payload never runs; every file of real checkpoints loads weights-only.
- Every file of a checkpoint is fsynced by the rank that wrote it, then the directory, before the
  completion marker; the directory again after it (2 ranks, a real DeepSpeed engine).
- Retention never deletes the newest complete checkpoint, nor an older one before a newer one is complete.
- A full disk (a small tmpfs) fails the save with one line naming the directory and the space needed, the
  run exits with 74, and the previous checkpoint stays complete and loadable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import train_launch as tl
from two_ranks import run_on_two_ranks

from synergy_dist.checkpoint import safe_load
from synergy_dist.checkpoint import store as ckpt
from synergy_dist.cli.eval import main as eval_main
from synergy_dist.cli.export import main as export_main
from synergy_dist.cli.generate import main as generate_main
from synergy_dist.cli.report import main as report_main
from synergy_dist.loading import load_model
from synergy_dist.train.distributed import CHECKPOINT_WRITE_EXIT_CODE

pytestmark = pytest.mark.slow


class RunsCode:
    """Unpickling it creates the file `marker` (through `open`): what a planted checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample_shards")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_dir) -> dict:
    """A tiny 2-step run with one checkpoint, at ZeRO-1 so that its optimizer file holds DeepSpeed's globals."""
    cfg = tl.tiny_config(tmp_path_factory.mktemp("runs") / "trained", sample_dir,
                         train={"max_steps": 2, "lr": 3e-3, "sample_bytes": 0}, deepspeed={"zero_stage": 1})
    assert tl.run(cfg) == 0, tl.output_of(cfg)[-4000:]
    return cfg


def checkpoint_of(cfg: dict) -> Path:
    return ckpt.resolve_checkpoint(Path(cfg["run"]["dir"]))


def test_every_file_of_a_real_checkpoint_loads_weights_only(trained):
    checkpoint = checkpoint_of(trained)
    files = sorted(checkpoint.glob("*.pt"))
    assert {f.name for f in files} >= {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                       "rank_00000.pt"}
    assert any(safe_load.ALLOWED_GLOBALS & set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
               for f in files)  # the allowlist is needed: these files hold more than tensors
    safe_load.check_checkpoint(checkpoint)
    with safe_load.weights_only_loads(checkpoint):  # the scan's names and the loader's objects are the same list
        registered = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
                      for entry in torch.serialization.get_safe_globals()}
    assert safe_load.ALLOWED_GLOBALS <= registered
    rng = safe_load.load(checkpoint / "rank_00000.pt")
    assert rng["numpy"][0] == "MT19937" and rng["numpy"][1].dtype.name == "uint32"
    optimizer = safe_load.load(checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    assert type(optimizer["loss_scaler"]).__name__ == "LossScaler"


def test_third_party_loads_are_weights_only_inside_the_guard(tmp_path):
    planted = tmp_path / "planted.pt"
    torch.save({"module": RunsCode(tmp_path / "code_ran")}, planted)
    refusal = (f"^refusing checkpoint {re.escape(str(tmp_path))}: weights-only loading failed "
               r"\(it would call io\.open\); delete it or restore it from a trusted copy$")
    with pytest.raises(safe_load.UnsafeCheckpointError, match=refusal):
        with safe_load.weights_only_loads(tmp_path):
            torch.load(planted, weights_only=False)  # what DeepSpeed's loaders ask for
    assert not (tmp_path / "code_ran").exists()
    torch.load(planted, weights_only=False)  # outside it, the payload is live
    assert (tmp_path / "code_ran").exists()


def plant(run_dir: Path, name: str, marker: Path) -> Path:
    """Replace the checkpoint's file `name` with a pickle that creates `marker`, and re-seal the completion
    marker (whoever plants a file controls the whole directory)."""
    checkpoint = ckpt.resolve_checkpoint(run_dir)
    torch.save({"module": RunsCode(marker)}, checkpoint / name)
    saved = json.loads((checkpoint / ckpt.MARKER).read_text())
    ckpt.write_marker(checkpoint, saved["step"], saved["world_size"])
    assert ckpt.check_complete(checkpoint) is None
    return checkpoint / name


def test_a_planted_pickle_is_refused_by_every_cli_and_by_resume(trained, sample_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run"]["dir"], run_dir)
    marker = tmp_path / "code_ran"
    file = plant(run_dir, "mp_rank_00_model_states.pt", marker)  # read by DeepSpeed on resume, by us elsewhere
    refusal = (f"refusing checkpoint file {file}: loading it would call io.open, which a checkpoint written by "
               "synergy-train never holds; delete it or restore the checkpoint from a trusted copy")
    calls = {
        "synergy-eval": lambda: eval_main(["--checkpoint", str(run_dir), "--data", str(sample_dir / "valid")]),
        "synergy-generate": lambda: generate_main(["--checkpoint", str(run_dir), "--prompt", "a", "--max-bytes", "4"]),
        "synergy-export": lambda: export_main([str(run_dir), "--output", str(tmp_path / "export")]),
        "synergy-report": lambda: report_main([str(run_dir), "--output", str(tmp_path / "report")]),
    }
    for name, call in calls.items():
        capsys.readouterr()
        assert call() == 2, name
        assert capsys.readouterr().err.splitlines() == [f"{name}: {refusal}"]
    assert not (tmp_path / "export" / "model.safetensors").exists()

    cfg = json.loads(json.dumps(trained))
    cfg["run"]["dir"] = str(run_dir)
    cfg["train"]["max_steps"] = 4  # resume from step 2
    assert tl.run(cfg) == 2
    output = tl.output_of(cfg)
    assert [line for line in output.splitlines() if str(file) in line] == [f"synergy-train: {refusal}"]
    assert "Traceback" not in output and not (run_dir / "checkpoints" / "step_00000004").exists()
    assert not marker.exists()  # the payload never ran


# ----------------------------------------------------------------------------- durable saves


def save_recording_fsyncs(rank: int, root: str) -> None:
    """Rank body: a 2-rank ZeRO-1 DeepSpeed engine saves a checkpoint; every fsync is recorded as
    (monotonic time, path) in root/fsyncs_<rank>.json."""
    import deepspeed  # heavy, and only in the ranks

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append((time.monotonic_ns(), os.readlink(f"/proc/self/fd/{fd}")))

    os.fsync = recording_fsync  # fsync has no visible effect short of a crash: record what was flushed
    try:
        ckpt.save_checkpoint(engine, Path(root) / "checkpoints", 3, {"step": 3}, rank, 2)
    finally:
        os.fsync = real_fsync
    Path(root, f"fsyncs_{rank}.json").write_text(json.dumps(synced))


def test_each_rank_fsyncs_its_files_then_the_directory_before_the_marker(tmp_path):
    run_on_two_ranks(save_recording_fsyncs, tmp_path, str(tmp_path))
    root = tmp_path / "checkpoints"
    path = root / ckpt.tag_for(3)
    listed = set(json.loads((path / ckpt.MARKER).read_text())["files"])
    fsyncs = {r: [(t, Path(p)) for t, p in json.loads((tmp_path / f"fsyncs_{r}.json").read_text())] for r in (0, 1)}
    files = {r: {p.name.removesuffix(".tmp") for _, p in fsyncs[r] if p.parent == path} for r in (0, 1)}
    assert files[1] == {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_00001.pt"}  # what rank 1 wrote
    assert files[0] == listed - files[1] | {ckpt.MARKER}  # the rest, the trainer state and the marker
    order = [p for _, p in fsyncs[0]]
    marker = order.index(path / (ckpt.MARKER + ".tmp"))
    before = order.index(path)  # the directory, once every file is flushed
    assert all(order.index(path / name) < before for name in files[0] - {ckpt.MARKER, ckpt.TRAINER_STATE})
    assert order.index(path / (ckpt.TRAINER_STATE + ".tmp")) < before < marker
    assert order[marker + 1:] == [path, root]  # after the marker: the directory, then its entry in checkpoints/
    marker_time = fsyncs[0][marker][0]
    assert max(t for t, _ in fsyncs[1]) < marker_time  # rank 1 flushed its files before rank 0 wrote the marker


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(bytes(100))
    if complete:
        ckpt.write_marker(path, step, 1)
    return path


def test_retention_keeps_the_newest_complete_checkpoint_and_deletes_only_after_a_newer_one_is_complete(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2, complete=False)
    assert ckpt.prune(root, keep_last=1, keep_every=0) == []  # nothing complete yet: nothing goes
    fake_checkpoint(root, 4)
    fake_checkpoint(root, 6, complete=False)  # a save in progress (or killed) after 4
    assert ckpt.prune(root, keep_last=1, keep_every=0) == [root / ckpt.tag_for(2)]  # the leftover older than 4
    damaged = fake_checkpoint(root, 8)
    (damaged / "model.pt").write_bytes(bytes(50))  # its marker exists, but a file was cut short
    assert ckpt.prune(root, keep_last=1, keep_every=0) == []  # 8 is not complete: 4 is still the newest
    assert [p.name for _, p in ckpt.list_step_dirs(root)] == ["step_00000004", "step_00000006", "step_00000008"]
    shutil.rmtree(root / ckpt.tag_for(6))
    shutil.rmtree(damaged)
    for step in (8, 10, 12):
        fake_checkpoint(root, step)
    assert ckpt.prune(root, keep_last=2, keep_every=8) == [root / ckpt.tag_for(4)]
    assert [p.name for _, p in ckpt.list_step_dirs(root)] == ["step_00000008", "step_00000010", "step_00000012"]


@pytest.fixture
def small_disk(tmp_path, trained):
    """RUN_DIR/checkpoints of a new run on a tmpfs that holds the first checkpoint of `trained`'s config but
    not a second one."""
    saved = Path(trained["run"]["dir"]) / "checkpoints"
    first = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())  # DeepSpeed's scripts included
    one = sum(f.stat().st_size for f in checkpoint_of(trained).iterdir())
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(first + one // 2) // 1024}k", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"the disk-full test mounts a small tmpfs and could not: {mounted.stderr.strip()} (needs root)")
    yield directory
    subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("launcher,nproc", [("single", 1), ("torchrun", 2)])
def test_a_full_disk_fails_the_save_with_one_line_and_exit_74_keeping_the_previous_checkpoint(trained, small_disk,
                                                                                               launcher, nproc):
    run_dir = small_disk.parent
    cfg = json.loads(json.dumps(trained))
    cfg["run"]["dir"] = str(run_dir)
    cfg["train"]["max_steps"] = 4  # checkpoints at steps 2 (fits) and 4 (does not)
    status = tl.run(cfg, launcher, nproc)
    output = tl.output_of(cfg)
    if nproc == 1:
        assert status == CHECKPOINT_WRITE_EXIT_CODE and "Traceback" not in output
    else:  # every rank exits with 74 (torchrun reports it, with its own traceback), none with a traceback
        assert status != 0 and output.count(f"exitcode  : {CHECKPOINT_WRITE_EXIT_CODE}") == nproc, output[-3000:]
        assert not re.search(r"\[rank\d\]: Traceback", output)
    lines = [line for line in output.splitlines() if "could not be written" in line]
    assert len(lines) == 1, output[-3000:]
    previous = small_disk / ckpt.tag_for(2)
    size = sum(s for s, _ in json.loads((previous / ckpt.MARKER).read_text())["files"].values())
    match = re.fullmatch(r"synergy-train: checkpoint step_00000004 could not be written in "
                         rf"{re.escape(str(small_disk))} \((writing \S+: )?No space left on device\); "
                         rf"a checkpoint of this run takes about {size / 2**20:.1f} MiB \(step_00000002\) and "
                         r"(\d+\.\d) MiB is free there: free space or move run\.dir, then resume from step_00000002, "
                         r"which is complete", lines[0])
    assert match, lines[0]
    assert float(match.group(2)) < size / 2**20
    assert not (small_disk / ckpt.tag_for(4)).exists()  # the partial directory is gone
    assert ckpt.resolve_checkpoint(run_dir) == previous and ckpt.check_complete(previous) is None
    model, _, source = load_model(run_dir)
    reference, _, _ = load_model(trained["run"]["dir"])  # the same 2 steps on 1 rank, on a disk with room
    assert source == previous
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b) if nproc == 1 else torch.allclose(a, b, rtol=1e-4, atol=1e-6)
