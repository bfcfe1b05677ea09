"""Checkpoints: save (every rank, then a completion marker last), find the newest complete one,
load it, and prune old ones.

Layout of one checkpoint, RUN_DIR/checkpoints/step_00000100/:
    DeepSpeed's files (model, optimizer partitions, expert shards)   written by engine.save_checkpoint
                        (names and contents: deepspeed_files.py)
    rank_00000.pt ...   every rank's RNG states                        written by each rank
    trainer_state.json  step, data position, safeguard state, config   written by rank 0
    COMPLETE            JSON list of every file with size and CRC32    written by rank 0, LAST

A directory without COMPLETE (killed mid-save) or whose files do not match COMPLETE (truncated or
overwritten) is skipped with a warning naming it and never loaded. A checkpoint written by another
number of ranks or expert-parallel size is re-sharded on load (elastic.py).

Durability: every file is fsynced by the rank that wrote it, then the directory, before COMPLETE is
written; the directory again after it. A write that fails (disk full, read-only) raises
CheckpointWriteError on every rank with one line, and the previous checkpoint stands. Loading never
runs code from a file (safe_load.py).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from synergy_dist.checkpoint import elastic, safe_load
from synergy_dist.checkpoint.deepspeed_files import recording_saves

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- finding


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def check_complete(path: Path, verify_files: bool = True) -> str | None:
    """None when the checkpoint at `path` is complete and intact, else the reason it is not."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker (killed while saving?)"
    try:
        listing = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"unreadable completion marker {marker}"
    for rel, (size, crc) in listing.items():
        file = path / rel
        if not file.is_file():
            return f"missing file {rel}"
        if file.stat().st_size != size:
            return f"file {rel} has {file.stat().st_size} bytes, expected {size} (truncated?)"
        if verify_files and _crc32(file) != crc:
            return f"file {rel} fails its CRC32 check (corrupted)"
    return None


class CheckpointNotFound(ValueError):
    """A path that is neither a complete checkpoint nor a run directory holding one."""


def resolve_checkpoint(path: Path) -> Path:
    """A complete checkpoint directory, given it or a run directory (its newest complete one)."""
    if (path / TRAINER_STATE).is_file():
        return path
    found = find_latest_complete(path / "checkpoints")
    if found is None:
        raise CheckpointNotFound(f"'{path}' is neither a checkpoint directory nor a run directory with a complete "
                                 "checkpoint under checkpoints/; pass RUN_DIR or RUN_DIR/checkpoints/step_XXXXXXXX")
    return found


def read_trainer_state(path: Path) -> dict:
    """The trainer state saved with the checkpoint at `path` (step, data position, config, ...)."""
    return json.loads((path / TRAINER_STATE).read_text())


def find_latest_complete(root: Path, verify_files: bool = True) -> Path | None:
    """Newest complete, intact checkpoint under `root`; warns about every newer one it skips."""
    for _, path in reversed(list_step_dirs(root)):
        problem = check_complete(path, verify_files)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


# ----------------------------------------------------------------------------- saving


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (disk full, read-only, quota); the previous one is untouched."""


def is_write_error(err: Exception) -> bool:
    """Whether `err` is a failed write rather than a bug: an OSError, or the RuntimeError of torch.save's
    archive writer (what a full disk gives it)."""
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and
                                        ("inline_container" in str(err) or "PytorchStreamWriter" in str(err)))


def save_checkpoint(engine: Any, root: Path, step: int, trainer_state: dict, rank: int, world_size: int,
                    on_rank_files_written: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    Each rank writes its files and fsyncs them; once every rank has, rank 0 writes the trainer state, fsyncs
    the directory, writes the completion marker and fsyncs the directory (and checkpoints/) again: a marker
    that survives a crash of the machine lists files that survived it too. A failed write on any rank raises
    CheckpointWriteError on every rank (one line: where, why, the space needed); the partial directory is
    removed, the previous checkpoint is untouched.

    on_rank_files_written(path) runs on each rank once its own files are written, before the ranks wait
    for each other and the completion marker is written (fault injection in tests)."""
    path = root / tag_for(step)
    failure = _agreed_failure(_make_directory(path) if rank == 0 else None, world_size)
    if failure is None:
        failure = _write_rank_files(engine, path, step, rank)
        if failure is None and on_rank_files_written is not None:
            on_rank_files_written(path)
    failure = _agreed_failure(failure, world_size)  # every rank has written and fsynced its files
    if failure is None and rank == 0:
        try:
            _fsync_write(path / TRAINER_STATE, json.dumps(trainer_state, indent=1))
            _fsync(path)  # every file's directory entry, before the marker says they are there
            write_marker(path, step, world_size)
            _fsync(path)
            _fsync(root)  # the step directory's own entry
        except OSError as err:
            failure = _write_failure(path, err)
    failure = _agreed_failure(failure, world_size)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointWriteError(failure)
    return path


def _make_directory(path: Path) -> str | None:
    """A fresh, empty checkpoint directory at `path` (None), or why it could not be made."""
    try:
        if path.exists():  # a leftover from an earlier, interrupted attempt at this step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    except OSError as err:
        return _write_failure(path, err)
    return None


def _write_rank_files(engine: Any, path: Path, step: int, rank: int) -> str | None:
    """This rank's files of the checkpoint (DeepSpeed's, then its RNG states), written and fsynced:
    None, or why they could not be."""
    try:
        with recording_saves(engine, is_write_error) as record:
            engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"step": step}, save_latest=False)
        if record.failures:
            file, err = record.failures[0]
            return _write_failure(path, err, file)
        rng_file = path / f"rank_{rank:05d}.pt"
        torch.save(rng_state(), rng_file)
        for file in [*record.written, rng_file]:
            _fsync(file)
    except Exception as err:
        if not is_write_error(err):
            raise
        return _write_failure(path, err)
    return None


def _agreed_failure(failure: str | None, world_size: int) -> str | None:
    """Collective, and a barrier: the lowest failing rank's message, the same on every rank (None: all fine)."""
    if world_size == 1:
        return failure
    gathered: list[str | None] = [None] * world_size
    dist.all_gather_object(gathered, failure)
    return next((f for f in gathered if f is not None), None)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _write_failure(path: Path, err: Exception, file: Path | None = None) -> str:
    """One line: the checkpoint that could not be written, where, why, the space it needs and what to do."""
    root = path.parent
    free = shutil.disk_usage(root).free if root.is_dir() else 0
    previous = next((p for _, p in reversed(list_step_dirs(root))
                     if p != path and check_complete(p, verify_files=False) is None), None)
    if previous is not None:
        needed = sum(size for size, _ in json.loads((previous / MARKER).read_text())["files"].values())
        space = f"a checkpoint of this run takes about {_mib(needed)} ({previous.name}) and {_mib(free)} is free there"
        then = f"resume from {previous.name}, which is complete"
    else:
        needed = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
        space = f"it needs more than the {_mib(needed)} written before the failure and {_mib(free)} is free there"
        then = "start again"
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:  # torch.save's writer does not say why; a full disk is what makes it fail
        reason = os.strerror(errno.ENOSPC) if free < needed else f"write failed: {str(err).splitlines()[0]}"
    where = f"writing {file.name}: " if file is not None else ""
    return (f"checkpoint {path.name} could not be written in {root} ({where}{reason}); {space}: free space or "
            f"move run.dir, then {then}")


def write_marker(path: Path, step: int, world_size: int) -> None:
    """The completion marker: every file's size and CRC32, written last (atomically)."""
    listing = {}
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name != MARKER:
            listing[str(file.relative_to(path))] = [file.stat().st_size, _crc32(file)]
    _fsync_write(path / MARKER, json.dumps({"step": step, "world_size": world_size, "files": listing}))


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints outside (newest keep_last) + (multiples of keep_every), and
    incomplete leftovers older than the newest complete one. Rank 0 only. Returns what it deleted.

    Complete means a marker whose files are all there at their recorded sizes, so a newer checkpoint that is
    incomplete or damaged never costs an older one, and nothing is deleted before one is complete; the newest
    complete checkpoint is always kept. A checkpoint loses its marker first: a deletion cut short leaves an
    incomplete directory, never one that looks complete."""
    dirs = list_step_dirs(root)
    complete = [(s, p) for s, p in dirs if check_complete(p, verify_files=False) is None]
    if not complete:
        return []
    keep = {p for _, p in complete[-max(keep_last, 1):]}
    if keep_every > 0:
        keep |= {p for s, p in complete if s % keep_every == 0}
    newest = complete[-1][0]
    complete_paths = {p for _, p in complete}
    deleted = []
    for step, path in dirs:
        if path not in keep and (path in complete_paths or step < newest):
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


# ----------------------------------------------------------------------------- loading


def saved_geometry(path: Path) -> tuple[int, int]:
    """(world size, expert-parallel size) that wrote the checkpoint at `path`."""
    world = json.loads((path / MARKER).read_text())["world_size"]
    config = read_trainer_state(path).get("config", {})
    return world, int(config.get("deepspeed", {}).get("expert_parallel_size", 1))


def load_checkpoint(engine: Any, path: Path, rank: int, world_size: int, expert_parallel_size: int = 1) -> dict:
    """Collective: restore engine state and this rank's RNG; returns the trainer state.

    A checkpoint written by another number of ranks or expert-parallel size is re-sharded (elastic.py).
    Every .pt file is checked before any is read, and every read is weights-only, DeepSpeed's included
    (safe_load.py): a file that would run code raises safe_load.UnsafeCheckpointError on every rank."""
    state = read_trainer_state(path)
    saved_world, saved_ep = saved_geometry(path)
    _refuse_unsafe_files(path, rank, world_size)
    with safe_load.weights_only_loads(path):
        _load_states(engine, path, saved_world, saved_ep, world_size, expert_parallel_size)
    rng_file = path / f"rank_{rank:05d}.pt"
    if saved_world == world_size and rng_file.is_file():
        set_rng_state(safe_load.load(rng_file))
    elif rank == 0:
        warnings.warn(f"checkpoint {path} was written by {saved_world} ranks, resuming on {world_size}: "
                      "random generators are re-seeded instead of restored", stacklevel=2)
    return state


def _refuse_unsafe_files(path: Path, rank: int, world_size: int) -> None:
    """Collective: rank 0 checks every .pt file of the checkpoint; every rank raises the same
    UnsafeCheckpointError for one that would run code."""
    problem: list[str | None] = [None]
    if rank == 0:
        try:
            safe_load.check_checkpoint(path)
        except safe_load.UnsafeCheckpointError as err:
            problem = [str(err)]
    if world_size > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise safe_load.UnsafeCheckpointError(problem[0])


def _load_states(engine: Any, path: Path, saved_world: int, saved_ep: int, world_size: int,
                 expert_parallel_size: int) -> None:
    """The engine's weights and optimizer state from `path`, re-sharded when the geometry changed."""
    zero_stage = engine.zero_optimization_stage()
    if (saved_world, saved_ep) != (world_size, expert_parallel_size) and zero_stage in (1, 2):
        # DeepSpeed refuses to re-partition ZeRO-1/2 optimizer state for a new world size, and its universal
        # checkpoint fails for MoE with expert parallelism: re-shard from a consolidated form ourselves.
        # DeepSpeed loads the weights (experts by global id, so any expert-parallel size works).
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True, load_module_strict=True)
        merged = elastic.consolidate_zero_checkpoint(path, saved_world, saved_ep)
        elastic.reshard_into_engine(engine, merged, str(path))
    elif saved_world != world_size and zero_stage == 3:
        # DeepSpeed refuses ZeRO-3 optimizer state written by another number of ranks; the model weights
        # live in that state too (the module file holds empty placeholders), so both come from it.
        elastic.load_zero3_resharded(engine, path, saved_world)
    elif saved_ep != expert_parallel_size and zero_stage == 0:
        # DeepSpeed would load the optimizer file of this rank's expert-parallel rank, written for other experts.
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True, load_module_strict=True)
        elastic.load_stage0_resharded(engine, elastic.consolidate_stage0_checkpoint(engine, path, saved_ep), str(path))
    elif saved_ep != expert_parallel_size:
        raise RuntimeError(f"checkpoint {path} was written with deepspeed.expert_parallel_size={saved_ep}, and "
                           f"deepspeed.zero_stage={zero_stage} cannot change the expert-parallel size on resume: "
                           f"set deepspeed.expert_parallel_size={saved_ep}")
    else:
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
