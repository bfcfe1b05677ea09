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
"""

from __future__ import annotations

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

from synergy_dist.checkpoint import elastic

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


def save_checkpoint(engine: Any, root: Path, step: int, trainer_state: dict, rank: int, world_size: int,
                    on_rank_files_written: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    on_rank_files_written(path) runs on each rank once its own files are written, before the ranks wait
    for each other and the completion marker is written (fault injection in tests)."""
    path = root / tag_for(step)
    if rank == 0:
        if path.exists():  # a leftover from an earlier, interrupted attempt at this step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    if world_size > 1:
        dist.barrier()
    engine.save_checkpoint(str(root), tag=path.name, client_state={"step": step}, save_latest=False)
    torch.save(rng_state(), path / f"rank_{rank:05d}.pt")
    if on_rank_files_written is not None:
        on_rank_files_written(path)
    if world_size > 1:
        dist.barrier()  # every rank has written its files
    if rank == 0:
        _fsync_write(path / TRAINER_STATE, json.dumps(trainer_state, indent=1))
        write_marker(path, step, world_size)
    if world_size > 1:
        dist.barrier()
    return path


def write_marker(path: Path, step: int, world_size: int) -> None:
    """The completion marker: every file's size and CRC32, written last (atomically)."""
    listing = {}
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name != MARKER:
            listing[str(file.relative_to(path))] = [file.stat().st_size, _crc32(file)]
    _fsync_write(path / MARKER, json.dumps({"step": step, "world_size": world_size, "files": listing}))


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints outside (newest keep_last) + (multiples of keep_every), and
    incomplete leftovers older than the newest complete one. Rank 0 only. Returns what it deleted."""
    dirs = list_step_dirs(root)
    complete = [(s, p) for s, p in dirs if (p / MARKER).is_file()]
    if not complete:
        return []
    keep = {p for _, p in complete[-keep_last:]}
    if keep_every > 0:
        keep |= {p for s, p in complete if s % keep_every == 0}
    newest = complete[-1][0]
    deleted = []
    for step, path in dirs:
        is_complete = (path / MARKER).is_file()
        if (is_complete and path not in keep) or (not is_complete and step < newest):
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

    A checkpoint written by another number of ranks or expert-parallel size is re-sharded (elastic.py)."""
    state = read_trainer_state(path)
    saved_world, saved_ep = saved_geometry(path)
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
    rng_file = path / f"rank_{rank:05d}.pt"
    if saved_world == world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif rank == 0:
        warnings.warn(f"checkpoint {path} was written by {saved_world} ranks, resuming on {world_size}: "
                      "random generators are re-seeded instead of restored", stacklevel=2)
    return state
