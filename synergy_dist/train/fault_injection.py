"""Fault injection for tests: everything the config's `debug:` section asks for, behind three hooks.

    faults = FaultInjector(cfg.debug, rank)
    loss = faults.on_loss(loss, batch_number)                    # NaN loss, Inf gradients, loss spike, stall
    save_checkpoint(..., on_rank_files_written=faults.on_save(step))   # SIGKILL half-way through a save
    faults.after_step(step, signalled)                           # hang until killed or signalled; slow steps

Faults are keyed by the global batch of the data stream (1-based), so a poisoned batch stays poisoned
and a rollback that skips past it leaves it behind. With the defaults every hook does nothing.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from synergy_dist.config import DebugConfig

HANG_LIMIT_S = 600.0  # the longest a debug hang or stall waits for the test that asked for it


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times `factor` backward: a gradient spike under an ordinary loss."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _kill_self(path: Path) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # dies with part of the checkpoint at `path` on disk


class FaultInjector:
    def __init__(self, cfg: DebugConfig, rank: int = 0):
        self.cfg = cfg
        self.rank = rank

    def on_loss(self, loss: torch.Tensor, batch_number: int) -> torch.Tensor:
        """The loss to back-propagate for global batch `batch_number`: NaN, spiked, with spiked or Inf gradients
        when the config poisons that batch, else `loss` itself. On a stalled batch (`stall_batches`, on
        `stall_rank` or every rank) it first sleeps HANG_LIMIT_S inside the step: a stuck step for the watchdog."""
        cfg = self.cfg
        if batch_number in cfg.stall_batches and cfg.stall_rank in (-1, self.rank):
            time.sleep(HANG_LIMIT_S)
        if batch_number in cfg.nan_loss_batches:
            loss = loss * float("nan")
        if batch_number in cfg.spike_loss_batches:
            loss = loss * cfg.spike_factor
        if batch_number in cfg.spike_grad_batches:
            loss = _ScaleGradient.apply(loss, cfg.spike_factor)
        if batch_number in cfg.inf_grad_batches:
            loss = _InfGradient.apply(loss)
        return loss

    def on_save(self, step: int) -> Callable[[Path], None] | None:
        """The hook for save_checkpoint's on_rank_files_written: SIGKILL once this rank's files of the
        checkpoint of `step` are written, when the config asks for it; else None."""
        return _kill_self if step and step == self.cfg.kill_in_save_at_step else None

    def after_step(self, step: int, signalled: Callable[[], bool]) -> None:
        """Sleep `step_sleep_s` after every step (a slow run). After step `hang_after_step`, wait until
        `signalled()` (SIGTERM/SIGUSR1 arrived) or HANG_LIMIT_S passed: a test kills the process here
        (kill -9) or signals it to checkpoint and stop."""
        if step and self.cfg.step_sleep_s:
            time.sleep(self.cfg.step_sleep_s)
        if not step or step != self.cfg.hang_after_step:
            return
        deadline = time.time() + HANG_LIMIT_S
        while not signalled() and time.time() < deadline:
            time.sleep(0.02)
