"""Launch environment, device, backend and dtype detection: the one place that knows about them.

Supported launchers: the `deepspeed` launcher and `torchrun` (RANK / LOCAL_RANK / WORLD_SIZE),
`srun` (SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, with MASTER_ADDR / MASTER_PORT from the job
script), and a plain single process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from synergy_dist.accelerator import set_deepspeed_accelerator, uses_cuda

# Exit statuses of synergy-train, one per way a run can end (docs/TRAINING.md; slurm/pretrain.sh reads them).
REQUEUE_EXIT_CODE = 75  # checkpointed on SIGTERM/SIGUSR1 (or a time limit): please requeue me
DATA_ERROR_EXIT_CODE = 65  # the data cannot be read (missing, corrupted, edited, other format): fix it, don't requeue
CHECKPOINT_WRITE_EXIT_CODE = 74  # a checkpoint could not be written (disk full, read-only): the previous one stands
WATCHDOG_EXIT_CODE = 76  # a step hung past the watchdog limit; stacks are in the log; requeued by slurm/pretrain.sh


@dataclass
class DistEnv:
    rank: int = 0  # global rank
    local_rank: int = 0  # rank on this node (selects the GPU)
    world_size: int = 1  # number of processes
    launcher: str = "single"  # "torch" (deepspeed/torchrun), "slurm" or "single"
    device: str = "cpu"  # torch device string for this rank
    backend: str = "gloo"  # torch.distributed backend

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def detect_env() -> DistEnv:
    """Read rank / world size from whichever launcher started us, and pick device and backend."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        launcher = "torch"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        launcher = "slurm"
    else:
        rank, world, local, launcher = 0, 1, 0, "single"
    if uses_cuda():
        device, backend = f"cuda:{local % torch.cuda.device_count()}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    return DistEnv(rank=rank, local_rank=local, world_size=world, launcher=launcher, device=device, backend=backend)


def init_distributed(denv: DistEnv, timeout_s: float = 600.0) -> None:
    """Set the variables torch.distributed and DeepSpeed expect, then create the process group, whose
    collectives raise after `timeout_s` seconds without the other ranks (distributed.timeout_s)."""
    set_deepspeed_accelerator()  # before deepspeed is imported anywhere
    os.environ["RANK"] = str(denv.rank)
    os.environ["LOCAL_RANK"] = str(denv.local_rank)
    os.environ["WORLD_SIZE"] = str(denv.world_size)
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", str(denv.world_size)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if denv.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process launch; export MASTER_ADDR and "
                               "MASTER_PORT (slurm/pretrain.sh derives them from the node list)")
        os.environ["MASTER_PORT"] = str(_free_port())
    if denv.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(denv.device))
    import deepspeed  # heavy (~1.2 s), and only after set_deepspeed_accelerator() above

    deepspeed.init_distributed(dist_backend=denv.backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))


def resolve_dtype(requested: str, device_type: str) -> torch.dtype:
    """'auto' -> bf16 on GPUs that support it, else fp32."""
    if requested == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def peak_flops_per_second(device_type: str, dtype: torch.dtype) -> float:
    """Nominal peak of one device, for MFU. CPU: a rough per-core figure, so MFU is indicative only."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "V100": 125e12}
        for key, peak in table.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 4
        return 100e12
    return 100e9 * max(1, torch.get_num_threads())  # ~ one AVX2 core with two FMA units at 3 GHz
