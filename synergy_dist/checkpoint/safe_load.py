"""Loading checkpoint files without running code: weights-only unpickling with an exact allowlist.

A .pt file is a pickle, and unpickling may call any function the file names: a planted file could run
code as the user. Every .pt file this project reads is therefore loaded with torch.load(weights_only=True),
which builds only tensors, containers, primitives and the globals allowlisted here, the ones real
checkpoints hold (ZeRO 0-3, MoE, fp32 and bf16, 1 and 2 ranks, inspected with
torch.serialization.get_unsafe_globals_in_checkpoint):

    rank_XXXXX.pt (NumPy's RNG state)   numpy._core.multiarray._reconstruct, numpy.ndarray, numpy.dtype
                                        (numpy.core.multiarray._reconstruct when written by NumPy 1)
    ZeRO-1/2/3 optimizer files          DeepSpeed's LossScaler (DynamicLossScaler with fp16), ZeroStageEnum,
                                        and (ZeRO-1/2) tensor_fragment.fragment_address

    check_checkpoint(path)      every .pt file of a checkpoint scanned (its pickle's globals, no tensors
                                read): UnsafeCheckpointError naming the first file that holds anything else
    load(file)                  one file, weights-only
    with weights_only_loads():  DeepSpeed's own readers (engine.load_checkpoint, zero_to_fp32), which ask
                                torch for weights_only=False, are made weights-only too (torch's
                                TORCH_FORCE_WEIGHTS_ONLY_LOAD) with the same allowlist
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ALLOWED_GLOBALS = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})
_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file whose loading would run code (or that is not a torch.save file at all)."""


@functools.cache
def _allowed_objects() -> list:
    """The allowlist as the objects torch's weights-only unpickler wants (names as they appear in files)."""
    # deferred: DeepSpeed is heavy and must be imported after synergy_dist.accelerator's policy
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np.ndarray.__reduce__(np.empty(0))[0]
    return [(reconstruct, "numpy._core.multiarray._reconstruct"), (reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32)),  # the RNG state's array is uint32
            LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def unsafe_globals(file: Path) -> list[str]:
    """What loading `file` would have to import beyond tensors and the allowlist (sorted); raises
    UnsafeCheckpointError when the file is not a readable torch.save archive."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception as err:  # not a zip, torchscript, truncated, or opcodes the scanner does not know
        raise UnsafeCheckpointError(f"refusing checkpoint file {file}: it cannot be checked for code ({err}); only "
                                    "torch.save's zip format can (DeepSpeed's default, checkpoint_serialization=true): "
                                    "delete it or restore the checkpoint from a trusted copy") from None
    return sorted(set(found) - ALLOWED_GLOBALS)


def check_file(file: Path) -> None:
    """UnsafeCheckpointError naming `file` when loading it would run anything outside the allowlist."""
    names = unsafe_globals(file)
    if names:
        raise UnsafeCheckpointError(f"refusing checkpoint file {file}: loading it would call {', '.join(names)}, "
                                    "which a checkpoint written by synergy-train never holds; delete it or restore "
                                    "the checkpoint from a trusted copy")


def check_checkpoint(path: Path) -> None:
    """check_file() on every .pt file of the checkpoint directory `path`."""
    for file in sorted(path.rglob("*.pt")):
        check_file(file)


def load(file: Path) -> Any:
    """torch.load(file) on the CPU, weights-only, after check_file()."""
    check_file(file)
    with weights_only_loads(file):
        return torch.load(file, map_location="cpu", weights_only=True)


@contextmanager
def weights_only_loads(source: Path) -> Iterator[None]:
    """Inside the block every torch.load is weights-only with the allowlist, including third-party calls
    that pass weights_only=False; a refused file raises UnsafeCheckpointError naming `source` (the file,
    or the checkpoint directory being read)."""
    saved = {key: os.environ.pop(key, None) for key in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_objects()):
            yield
    except pickle.UnpicklingError as err:  # what the scan could not see; torch's message is many lines
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        detail = f"it would call {named.group(1)}" if named else "it holds objects other than tensors"
        raise UnsafeCheckpointError(f"refusing checkpoint {source}: weights-only loading failed ({detail}); delete "
                                    "it or restore it from a trusted copy") from None
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
