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


def test_model_benchmark_options_choose_the_device_rows():
    from synergy_dist.bench.device import configs_for
    from synergy_dist.bench.model import ModelBenchConfig

    assert configs_for(ModelBenchConfig(), quick=False) == []  # the CPU comparison alone
    gpu = configs_for(ModelBenchConfig(device="cuda"), quick=False)
    assert [c.device for c in gpu] == ["cuda"] and gpu[0].modes == ["eager", "inductor"]
    assert gpu[0].configs == ["configs/tiny-cpu.yaml", "configs/base-100m.yaml"]
    compiled = configs_for(ModelBenchConfig(compile=True, seq_len=1024, steps=3), quick=False)
    assert [(c.device, c.dtype, c.seq_len, c.steps) for c in compiled] == [("cpu", "fp32", 1024, 3)]
