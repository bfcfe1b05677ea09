"""Trainer pieces without processes: checkpoint discovery/retention, safeguards, LR schedule, metrics,
fault injection, stop-signal handlers."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import statistics
import warnings
from pathlib import Path

import pytest
import torch

from synergy_dist.checkpoint import store as ckpt
from synergy_dist.config import SafeguardConfig, load_config
from synergy_dist.model.moe.statistics import MoEStats
from synergy_dist.model.statistics import ModelStatistics, StageStatistics
from synergy_dist.train.metrics import MetricsLogger, format_duration, read_metrics
from synergy_dist.train.safeguards import Safeguards
from synergy_dist.train.schedule import lr_at


def fake_checkpoint(root: Path, step: int, complete: bool = True, payload: bytes = b"x" * 100) -> Path:
    path = root / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(payload)
    (path / "rank_00000.pt").write_bytes(b"rng")
    if complete:
        ckpt.write_marker(path, step, world_size=1)
    return path


def latest_with_warnings(root: Path) -> tuple[Path | None, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = ckpt.find_latest_complete(root)
    return found, [str(w.message) for w in caught]


def test_newest_complete_checkpoint_wins(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    found, warned = latest_with_warnings(tmp_path)
    assert found == tmp_path / "step_00000006" and warned == []
    assert ckpt.find_latest_complete(tmp_path / "absent") is None


def test_incomplete_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, complete=False)
    found, warned = latest_with_warnings(tmp_path)
    assert found == tmp_path / "step_00000002"
    assert warned == [f"skipping checkpoint {tmp_path / 'step_00000004'}: no completion marker (killed while saving?)"]


def test_truncated_and_corrupted_checkpoints_are_skipped(tmp_path):
    fake_checkpoint(tmp_path, 2)
    truncated = fake_checkpoint(tmp_path, 4)
    (truncated / "model.pt").write_bytes(b"x" * 50)
    flipped = fake_checkpoint(tmp_path, 6)
    (flipped / "model.pt").write_bytes(b"x" * 99 + b"y")
    found, warned = latest_with_warnings(tmp_path)
    assert found == tmp_path / "step_00000002"
    assert warned == [
        f"skipping checkpoint {flipped}: file model.pt fails its CRC32 check (corrupted)",
        f"skipping checkpoint {truncated}: file model.pt has 50 bytes, expected 100 (truncated?)",
    ]


def test_prune_keeps_last_k_and_every_mth_and_drops_stale_incomplete(tmp_path):
    for step in range(1, 11):
        fake_checkpoint(tmp_path, step, complete=(step != 3))
    deleted = ckpt.prune(tmp_path, keep_last=2, keep_every=4)
    remaining = [s for s, _ in ckpt.list_step_dirs(tmp_path)]
    assert remaining == [4, 8, 9, 10]
    assert len(deleted) == 6  # 1, 2, 3 (incomplete, older than 10), 5, 6, 7


def guards(**overrides) -> Safeguards:
    values = dict(spike_zscore=4.0, spike_window=10, spike_min_history=5, max_consecutive_spikes=3)
    values.update(overrides)
    return Safeguards(SafeguardConfig(**values))


def feed(g: Safeguards, losses: list[float], grad_norm: float = 1.0) -> list[str]:
    reasons = []
    for loss in losses:
        verdict = g.judge(loss, grad_norm)
        g.record(verdict, loss, grad_norm)
        reasons.append(verdict.reason + ("+rollback" if verdict.rollback else ""))
    return reasons


def test_nonfinite_loss_or_grad_norm_is_skipped_and_counted():
    g = guards()
    assert feed(g, [2.0, float("nan"), 2.0]) == ["ok", "nonfinite", "ok"]
    verdict = g.judge(2.0, float("inf"))
    assert (verdict.apply, verdict.reason) == (False, "nonfinite")
    g.record(verdict, 2.0, float("inf"))
    assert g.state.skipped_nonfinite == 2 and g.state.losses == [2.0, 2.0]


def test_spikes_are_skipped_and_k_in_a_row_ask_for_rollback():
    g = guards()
    history = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95]
    assert feed(g, history) == ["ok"] * 6
    # the z-score's boundary (spike_zscore=4 robust standard deviations), where the ratio test is off
    center = statistics.median(history)
    spread = 1.4826 * statistics.median(abs(x - center) for x in history)
    zscore_only = guards(spike_ratio=1.0)
    feed(zscore_only, history)
    assert zscore_only.judge(center + 3.9 * spread, 1.0).reason == "ok"
    assert zscore_only.judge(center + 4.1 * spread, 1.0).reason == "loss_spike"
    assert g.judge(center + 4.1 * spread, 1.0).reason == "ok"  # with the default ratio: 1.1x the median is no spike
    assert feed(g, [10.0, 10.0]) == ["loss_spike", "loss_spike"]
    assert g.state.consecutive_spikes == 2
    assert feed(g, [10.0]) == ["loss_spike+rollback"]
    assert g.state.skipped_spikes == 3 and g.state.consecutive_spikes == 0


def test_grad_norm_spike_and_no_detection_before_min_history():
    g = guards()
    assert feed(g, [2.0, 50.0, 2.0]) == ["ok", "ok", "ok"]  # only 1-2 steps of history: no spike test yet
    g = guards()
    feed(g, [2.0, 2.1, 1.9, 2.0, 2.05])
    verdict = g.judge(2.0, 100.0)
    assert (verdict.apply, verdict.reason) == (False, "grad_spike")


def test_a_spike_must_also_be_large_in_absolute_terms():
    """A steady window makes ordinary noise many standard deviations out: spike_ratio x the mean is needed too."""
    steady = [0.80 + 0.002 * (i % 5) for i in range(10)]  # mean 0.804, std ~0.0015: 1.04 is ~150 sigma out
    g, zscore_alone = guards(spike_ratio=3.0), guards(spike_ratio=1.0)
    assert feed_grads(g, steady) == feed_grads(zscore_alone, steady) == ["ok"] * 10
    # judge() is pure: each value is tested against the same window
    assert [g.judge(2.0, v).reason for v in (1.04, 2.4, 2.42)] == ["ok", "ok", "grad_spike"]  # 1.3x, 2.99x, 3.01x
    assert zscore_alone.judge(2.0, 1.04).reason == "grad_spike"


def feed_grads(g: Safeguards, grad_norms: list[float], loss: float = 2.0) -> list[str]:
    reasons = []
    for grad_norm in grad_norms:
        verdict = g.judge(loss, grad_norm)
        g.record(verdict, loss, grad_norm)
        reasons.append(verdict.reason)
    return reasons


HEALTHY_TRACE = Path(__file__).parent / "data" / "healthy_trace.json.gz"


def healthy_trace() -> list[tuple[int, float, float]]:
    """(step, loss, grad norm) of every step of a healthy run (how it was made: the file's "run" entry)."""
    data = json.loads(gzip.decompress(HEALTHY_TRACE.read_bytes()))
    return list(zip(data["step"], data["loss"], data["grad_norm"]))


def replay(trace, cfg: SafeguardConfig, spike_at: int = 0, spiked: str = "") -> list[tuple[int, str]]:
    """The (step, reason) of every update the safeguards skip when the trace is fed to them in order,
    with the loss or the grad norm of step `spike_at` multiplied by 10."""
    g = Safeguards(cfg)
    skipped = []
    for step, loss, grad_norm in trace:
        if step == spike_at:
            loss, grad_norm = (loss * 10, grad_norm) if spiked == "loss" else (loss, grad_norm * 10)
        verdict = g.judge(loss, grad_norm)
        g.record(verdict, loss, grad_norm)
        if not verdict.apply:
            skipped.append((step, verdict.reason))
    return skipped


def test_the_defaults_skip_nothing_on_a_healthy_run():
    trace = healthy_trace()
    assert len(trace) == 1400 and [s for s, _, _ in trace] == list(range(1, len(trace) + 1))
    assert replay(trace, SafeguardConfig()) == []


@pytest.mark.parametrize("spiked, reason", [("loss", "loss_spike"), ("grad_norm", "grad_spike")])
def test_the_defaults_catch_a_10x_spike_anywhere_in_a_healthy_run(spiked, reason):
    trace = healthy_trace()
    cfg = SafeguardConfig()
    for at in range(cfg.spike_min_history + 1, len(trace) + 1, 7):
        assert replay(trace, cfg, at, spiked) == [(at, reason)], f"10x {spiked} at step {at}"


def test_safeguard_state_round_trips():
    g = guards()
    feed(g, [2.0, float("nan"), 2.1])
    g.record_rollback(at_step=9, to_step=6, skipped_samples=(24, 36))
    h = guards()
    h.load_state_dict(g.state_dict())
    assert h.state == g.state and h.state.rollbacks == [{"at_step": 9, "to_step": 6, "skipped_samples": [24, 36]}]


def model_statistics(compression: float, layer: str, loads: list[float]) -> ModelStatistics:
    """Statistics of a one-stage model with one MoE layer; only compression and expert load are set."""
    zero = torch.zeros(())
    stage = StageStatistics(**{f.name: zero for f in dataclasses.fields(StageStatistics)})
    stage.compression = torch.tensor(compression)
    moe = MoEStats(**{f.name: zero for f in dataclasses.fields(MoEStats)})
    moe.tokens_per_expert = torch.tensor(loads)
    return ModelStatistics([stage], {layer: moe})


def test_router_alarms():
    g = guards(compression_band=[0.5, 2.0], min_load_entropy_ratio=0.5, dead_expert_fraction=0.05)
    stats = model_statistics(9.0, "middle.1", [100.0, 100.0, 1.0, 99.0])
    alarms = g.router_alarms(stats, {"stage0": 4.0})
    assert alarms == {
        "stage0/compression": "stage0: realised 9.00 inputs/concept is outside [2.00, 8.00] (target 4)",
        "moe/middle.1/dead_experts": "moe/middle.1: dead experts [2] (load < 0.05 x mean)",
    }
    collapsed = model_statistics(4.0, "m", [1000.0, 1.0, 1.0, 1.0])
    assert set(g.router_alarms(collapsed, {"stage0": 4.0})) == {"moe/m/dead_experts", "moe/m/load_entropy"}
    healthy = model_statistics(4.4, "m", [90.0, 110.0, 100.0, 100.0])
    assert g.router_alarms(healthy, {"stage0": 4.0}) == {}


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_lr_schedule_shapes(kind):
    cfg = load_config(None, [f"schedule.kind={kind}", "schedule.warmup_steps=10", "train.max_steps=100",
                             "train.lr=1e-3", "schedule.min_lr_ratio=0.1", "schedule.decay_fraction=0.2"])
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup
    assert max(lrs) == pytest.approx(1e-3)
    if kind == "constant":
        assert lrs[10:] == [1e-3] * 90
    elif kind == "cosine":
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
        assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)
    else:
        assert lrs[10:80] == [1e-3] * 70 and lrs[-1] == pytest.approx(1e-4 + 0.9e-3 / 20)


def test_metrics_jsonl_one_object_per_logged_step(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, enabled=True, max_steps=10, tensorboard=False, console=True)
    logger.log(1, {"loss": 2.0, "bpb": 2.885, "lr": 1e-3})
    logger.log(2, {"loss": 1.5, "bpb": 2.164})
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 2.0, "bpb": 2.885, "lr": 1e-3}, {"step": 2, "loss": 1.5, "bpb": 2.164}]
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("step 2/10 | loss 1.5000 | bpb 2.1640 | ETA ")
    silent = MetricsLogger(tmp_path / "other", enabled=False, max_steps=10, tensorboard=False)
    silent.log(1, {"loss": 1.0, "bpb": 1.0})
    assert not (tmp_path / "other" / "metrics.jsonl").exists()
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s"


def test_metrics_also_go_to_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, enabled=True, max_steps=10, tensorboard=True, console=True)
    logger.log(1, {"loss": 2.0, "bpb": 2.885, "bytes_per_concept": 4.25, "skip_reason": "ok"})
    logger.log(2, {"loss": 1.5, "bpb": 2.164, "bytes_per_concept": 3.75})
    logger.close()
    assert capsys.readouterr().err.splitlines()[-1].startswith("step 2/10 | loss 1.5000 | bpb 2.1640 | 3.75 B/concept")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "bpb", "bytes_per_concept"}  # strings are not scalars
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.5)]
    assert [e.value for e in events.Scalars("bytes_per_concept")] == [4.25, 3.75]


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")


@pytest.mark.parametrize("env,expected", [
    ({}, ("single", 0, 0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, ("torch", 3, 1, 4)),
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}, ("slurm", 5, 1, 8)),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}, ("single", 0, 0, 1)),
    # the deepspeed launcher inside a SLURM allocation: its RANK wins over SLURM's task id
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, ("torch", 1, 1, 2)),
])
def test_launch_environment_detection(monkeypatch, env, expected):
    from synergy_dist.train.distributed import detect_env

    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    denv = detect_env()
    assert (denv.launcher, denv.rank, denv.local_rank, denv.world_size) == expected
    assert (denv.device, denv.backend) == ("cpu", "gloo")  # DS_ACCELERATOR=cpu in tests


def test_resolve_dtype():
    import torch

    from synergy_dist.train.distributed import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp32", "cuda") == torch.float32


def test_each_checkout_preprocesses_the_bundled_sample_into_its_own_cache(tmp_path, monkeypatch):
    """The cache key includes the corpus path: a second checkout must not trip over the first one's
    shard set (whose plan records the other path) in the shared ~/.cache."""
    import shutil

    import synergy_dist
    from synergy_dist.train.data import sample_shards

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, [])
    found = []
    for checkout in ("a", "b"):
        corpus = tmp_path / checkout / "sample.jsonl.zst"
        corpus.parent.mkdir()
        shutil.copy(synergy_dist.SAMPLE_CORPUS, corpus)
        monkeypatch.setattr(synergy_dist, "SAMPLE_CORPUS", corpus)
        train, valid = sample_shards(cfg, is_main=True)
        assert (Path(train[0]) / "manifest.json").is_file() and (Path(valid[0]) / "manifest.json").is_file()
        found.append(train[0])
    assert found[0] != found[1]
    assert all(str(tmp_path / "home" / ".cache" / "synergy_dist") in path for path in found)


def test_fault_injection_poisons_only_the_named_batches():
    import torch

    from synergy_dist.config import DebugConfig
    from synergy_dist.train.fault_injection import FaultInjector

    faults = FaultInjector(DebugConfig(nan_loss_batches=[2], inf_grad_batches=[3], spike_loss_batches=[4],
                                       spike_factor=10.0, kill_in_save_at_step=6, hang_after_step=5))
    x = torch.tensor(2.0, requires_grad=True)
    assert faults.on_loss(x * 1.5, 1).item() == 3.0
    assert math.isnan(faults.on_loss(x * 1.5, 2).item())
    assert faults.on_loss(x * 1.5, 4).item() == 30.0
    poisoned = faults.on_loss(x * 1.5, 3)
    assert poisoned.item() == 3.0  # the loss stays finite, its gradients do not
    poisoned.backward()
    assert math.isinf(x.grad.item())
    x.grad = None
    spiked = FaultInjector(DebugConfig(spike_grad_batches=[7], spike_factor=10.0)).on_loss(x * 1.5, 7)
    assert spiked.item() == 3.0  # the loss is unchanged, its gradients are 10x
    spiked.backward()
    assert x.grad.item() == 15.0
    assert faults.on_save(5) is None and callable(faults.on_save(6))
    faults.after_step(4, signalled=lambda: False)  # not the hang step: returns at once
    faults.after_step(5, signalled=lambda: True)  # the hang step, already signalled: returns at once
    idle = FaultInjector(DebugConfig())
    assert idle.on_save(0) is None and idle.on_loss(x, 0) is x
    idle.after_step(0, signalled=lambda: False)


def test_stop_signal_handlers_are_restored_after_the_block_returns_or_raises():
    import os
    import signal

    from synergy_dist.train.trainer import stop_signal_handlers

    received = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with stop_signal_handlers(lambda signum, frame: received.append(signum)):
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert received == [signal.SIGUSR1]
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with pytest.raises(RuntimeError):
        with stop_signal_handlers(lambda signum, frame: None):
            raise RuntimeError("a step failed")
    assert {sig: signal.getsignal(sig) for sig in before} == before
