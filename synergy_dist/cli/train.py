"""`synergy-train --config configs/X.yaml [key.sub_key=value ...]`

Runs single-process, or under `deepspeed --num_gpus N`, `torchrun --nproc_per_node N` and `srun`
(the launcher is detected from the environment). Exit status: 0 when done, 75 after a
SIGTERM/SIGUSR1 checkpoint (requeue me), 2 for a bad configuration or a checkpoint file that would run
code, 74 when a checkpoint cannot be written (disk full; the previous one stands).
"""

from __future__ import annotations

import argparse
import os
import sys

from synergy_dist.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synergy-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.middle.repeat=12")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"synergy-train: configuration error: {err}", file=sys.stderr)
        return 2
    # MKL's results may depend on memory alignment; a resumed process allocates differently, so ask
    # for alignment-independent results (needed for bitwise-equal losses after a resume on CPU).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    # Heavy imports (torch.distributed, DeepSpeed, the trainer) only after the config is valid.
    from synergy_dist.checkpoint.safe_load import UnsafeCheckpointError
    from synergy_dist.train.distributed import detect_env
    from synergy_dist.train.trainer import train

    try:
        status = train(cfg)
    except ConfigError as err:  # checks that need the world size
        print(f"synergy-train: configuration error: {err}", file=sys.stderr)
        return 2
    except UnsafeCheckpointError as err:  # every rank refuses the same file; one line says so
        if detect_env().rank == 0:
            print(f"synergy-train: {err}", file=sys.stderr)
        status = 2
    if detect_env().world_size > 1:
        # After a clean multi-rank run (everything written, closed and past a final barrier), the
        # interpreter's teardown sometimes aborts in a leftover C++ thread ("terminate called without
        # an active exception", SIGABRT), turning success into a crash the launcher reports. Leave
        # without that teardown so the exit status is the trainer's.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
