"""The trainer's phase clock: per-phase wall and CPU seconds, and `other` as the step's remainder."""

from __future__ import annotations

import time

import pytest

from synergy_dist.train.phases import PHASES, PhaseClock


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_phases_accumulate_and_the_rest_is_other():
    clock = PhaseClock()
    with clock.phase("forward"):
        busy(0.03)
    with clock.phase("forward"):  # a second micro-batch adds to the same phase
        busy(0.02)
    with clock.phase("backward"):
        busy(0.04)
    busy(0.03)  # outside any phase: the trainer's own time
    time.sleep(0.05)  # waiting costs wall time, not CPU time
    out = clock.summary()
    assert out["cpu_forward_s"] == pytest.approx(0.05, abs=0.01)
    assert out["cpu_backward_s"] == pytest.approx(0.04, abs=0.01)
    assert out["cpu_other_s"] == pytest.approx(0.03, abs=0.01)
    assert out["cpu_data_s"] == 0.0 and out["cpu_optimizer_s"] == 0.0
    assert out["time_other_s"] >= 0.03 + 0.05 - 0.005
    assert out["cpu_step_s"] == pytest.approx(sum(out[f"cpu_{p}_s"] for p in (*PHASES, "other")))


def test_a_phase_that_raises_is_still_counted_and_reset_starts_over():
    clock = PhaseClock()
    with pytest.raises(RuntimeError):
        with clock.phase("optimizer"):
            busy(0.02)
            raise RuntimeError("boom")
    assert clock.summary()["cpu_optimizer_s"] >= 0.015
    clock.reset()
    assert clock.summary()["cpu_optimizer_s"] == 0.0
