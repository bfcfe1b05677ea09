"""bench/device.py, the GPU throughput benchmark, run on the CPU: every figure is there and in range."""

from __future__ import annotations

from synergy_dist.bench.device import DeviceBenchConfig, run


def test_device_benchmark_reports_speed_mfu_and_first_step_per_row():
    cfg = DeviceBenchConfig(device="cpu", configs=["configs/tiny-cpu.yaml"], modes=["eager"], dtype="fp32",
                            seq_len=128, batch_size=1, steps=2, warmup_steps=1, matmul_size=128)
    report = run(cfg, "synergy-bench model --device cpu")
    assert report.value("matmul_flops_per_s") > 0
    assert report.value("tiny-cpu_eager_bytes_per_s") > 0
    assert len(report.figures["tiny-cpu_eager_bytes_per_s"].samples) == 2
    assert 0 < report.value("tiny-cpu_eager_mfu") <= 100
    assert report.value("tiny-cpu_eager_first_step_s") > 0
    assert "peak_memory" not in " ".join(report.figures)  # CUDA's allocator statistics only
