"""bench/device.py, the GPU throughput benchmark, run on the CPU: every figure is there and in range."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.vocab import EOD_ID
from synergy_dist.bench.device import DeviceBenchConfig, run, step_batches


@pytest.mark.parametrize("packed", [False, True])
def test_device_benchmark_reports_speed_mfu_and_first_step_per_row(packed):
    cfg = DeviceBenchConfig(device="cpu", configs=["configs/tiny-cpu.yaml"], modes=["eager"], dtype="fp32",
                            seq_len=128, batch_size=2, steps=2, warmup_steps=1, matmul_size=128, packed=packed)
    report = run(cfg, "synergy-bench model --device cpu")
    assert ("EOD-packed" in report.figures["tiny-cpu_eager_bytes_per_s"].detail) == packed
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


def test_packed_rows_train_on_new_windows_of_several_documents_each_step():
    batches = step_batches(seq_len=256, batch=2, n_steps=3, packed=True, device=torch.device("cpu"))
    assert len(batches) == 3
    for input_ids, labels in batches:
        assert input_ids.shape == labels.shape == (2, 256)
        assert torch.equal(input_ids[:, 1:], labels[:, :-1])  # labels are the next bytes
        assert ((input_ids == EOD_ID).sum(dim=1) >= 3).all()  # documents cut to <= seq_len / 4 bytes
    assert not torch.equal(batches[0][0], batches[1][0])  # new windows each step
    text = step_batches(seq_len=256, batch=2, n_steps=2, packed=False, device=torch.device("cpu"))
    assert torch.equal(text[0][0], text[1][0]) and not (text[0][0] == EOD_ID).any()


def test_batch_size_and_packed_options_reach_the_compiled_rows():
    from synergy_dist.bench.device import configs_for
    from synergy_dist.bench.model import config_from_args
    from synergy_dist.cli.bench import build_parser

    args = build_parser().parse_args(["model", "--compile", "--packed", "--batch-size", "8", "--seq-len", "512"])
    [compiled] = configs_for(config_from_args(args), quick=False)
    assert (compiled.batch_size, compiled.seq_len, compiled.packed) == (8, 512, True)
    for argv, message in ((["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                          (["--packed"], "--packed applies to the --compile and --device cuda rows; add one"),
                          (["--device", "cuda", "--batch-size", "8"], "the --device cuda rows train at each config's")):
        with pytest.raises(ValueError, match=message):
            config_from_args(build_parser().parse_args(["model", *argv]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda, but torch .* sees no CUDA device; run it on a GPU"):
            config_from_args(build_parser().parse_args(["model", "--device", "cuda"]))
