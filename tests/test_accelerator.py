"""The device policy: DeepSpeed is told the accelerator before its first import, so nothing it
would announce lands on stdout (where synergy-generate streams its text)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from synergy_dist.accelerator import set_deepspeed_accelerator, uses_cuda


def test_importing_the_model_prints_nothing_on_stdout_and_sets_the_policy():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = ("import os, synergy_dist.model.moe.layer, deepspeed.accelerator as a; "
            "print(os.environ['DS_ACCELERATOR'], a.get_accelerator().device_name())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert proc.stdout.split() == [expected, expected]  # the only output is ours: no DeepSpeed announcement


def test_a_value_the_user_exported_wins(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert set_deepspeed_accelerator() == "cpu" and not uses_cuda()
    monkeypatch.delenv("DS_ACCELERATOR")
    assert set_deepspeed_accelerator() == ("cuda" if torch.cuda.is_available() else "cpu")
