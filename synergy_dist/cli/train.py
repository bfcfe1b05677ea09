"""`synergy-train --config configs/X.yaml [key.sub_key=value ...]`

Runs single-process, or under `deepspeed --num_gpus N`, `torchrun --nproc_per_node N` and `srun`
(the launcher is detected from the environment). Exit status: 0 when done, 75 after a
SIGTERM/SIGUSR1 checkpoint (requeue me), 2 for a bad configuration or a checkpoint file that would run
code, 65 when the data cannot be read (missing, damaged, edited or of another format version: the line
names the file and the fix), 74 when a checkpoint cannot be written (disk full; the previous one stands),
76 when the step watchdog finds a hung step. A user error prints one line and no traceback;
SYNERGY_DEBUG=1 shows the traceback too.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from synergy_dist.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synergy-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.middle.repeat=12")
    return parser


def _debug() -> bool:
    return os.environ.get("SYNERGY_DEBUG", "") not in ("", "0")


def _fail(kind: str, err: Exception, status: int) -> int:
    """One line on stderr (the traceback too with SYNERGY_DEBUG=1); returns the exit status."""
    if _debug():
        traceback.print_exception(err)
    print(f"synergy-train: {kind}: {err}", file=sys.stderr, flush=True)
    return status


def _exit(status: int, world_size: int) -> int:
    if world_size > 1:
        # After a multi-rank run, the interpreter's teardown sometimes aborts in a leftover C++ thread
        # ("terminate called without an active exception", SIGABRT), turning the trainer's status into
        # a crash the launcher reports. Leave without that teardown so the exit status is the trainer's.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _fail("configuration error", err, 2)
    # MKL's results may depend on memory alignment; a resumed process allocates differently, so ask
    # for alignment-independent results (needed for bitwise-equal losses after a resume on CPU).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    # Heavy imports (torch.distributed, DeepSpeed, the trainer) only after the config is valid.
    from synergy_dist.checkpoint.safe_load import UnsafeCheckpointError
    from synergy_dist.train.data import DataError
    from synergy_dist.train.distributed import DATA_ERROR_EXIT_CODE, detect_env
    from synergy_dist.train.trainer import train

    world_size = detect_env().world_size
    try:
        status = train(cfg)
    except ConfigError as err:  # checks that need the world size
        status = _fail("configuration error", err, 2)
    except DataError as err:  # every rank raises it at the same point; the last checkpoint is untouched
        status = _fail("data error", err, DATA_ERROR_EXIT_CODE)
    except UnsafeCheckpointError as err:  # every rank refuses the same file; rank 0's line says so
        if _debug():
            traceback.print_exception(err)
        if detect_env().rank == 0:
            print(f"synergy-train: {err}", file=sys.stderr, flush=True)
        status = 2
    return _exit(status, world_size)


if __name__ == "__main__":
    sys.exit(main())
