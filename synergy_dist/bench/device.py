"""`synergy-bench model --device cuda`: training-step throughput, MFU and peak memory on an accelerator.

For each config (default: configs/tiny-cpu.yaml and configs/base-100m.yaml) and each execution mode (eager,
and `train.compile`'s blocks through inductor), one model trains a few steps on the bundled sample text (one
running text, or with `--packed` new windows of EOD-packed documents each step, as training feeds it) at
the config's micro-batch and sequence length, in bf16 autocast with float32 parameters as synergy-train runs
it (bench/loop.py's AdamW step; learning rate 0 so a learned router's compression stays put while timing).
Reported per row: bytes/s (median of the timed steps, each between two device synchronisations), model
FLOPs per byte at the realised compression (model/accounting.py), MFU against a bf16 matmul measured in the
same run on the same device (not the datasheet peak), peak allocated memory next to synergy-plan's estimate,
and the first step's time (compilation included). Runs on the CPU too (`--device cpu`), which is how the
tests exercise it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from synergy_dist.bench.loop import PlainLoop
from synergy_dist.bench.model import ModelBenchConfig, packed_windows, sample_text, step_config
from synergy_dist.bench.paths import resolve
from synergy_dist.bench.results import BenchResults, Figure, figure_from
from synergy_dist.bench.timing import pin_to_one_core
from synergy_dist.config import load_config
from synergy_dist.model.accounting import flops_per_byte
from synergy_dist.model.config import ModelConfig
from synergy_dist.model.synergy import SynergyLM
from synergy_dist.plan import GiB, activation_bytes
from synergy_dist.train.compile import compile_blocks, compile_counts

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class DeviceBenchConfig:
    device: str = "cuda"
    configs: list[str] = field(default_factory=lambda: ["configs/tiny-cpu.yaml", "configs/base-100m.yaml"])
    modes: list[str] = field(default_factory=lambda: ["eager", "inductor"])  # "eager" or a compile backend
    dtype: str = "bf16"  # autocast dtype ("fp32": none)
    seq_len: int = 0  # bytes per sequence; 0 = the config's data.seq_len
    batch_size: int = 0  # sequences per step; 0 = the config's batch.micro_batch_size
    steps: int = 10  # timed steps (median reported)
    warmup_steps: int = 3  # untimed steps first (the first one compiles)
    matmul_size: int = 8192  # n of the n x n x n matmul that sets the FLOP/s ceiling
    packed: bool = False  # windows of EOD-packed documents (as training packs them) instead of one running text


def configs_for(model_cfg: ModelBenchConfig, quick: bool) -> list[DeviceBenchConfig]:
    """What `synergy-bench model` runs here: the GPU rows (--device cuda), or on the CPU with --compile the
    config's model compiled against eager, one process pinned to one core, fp32."""
    if model_cfg.device != "cpu":
        cfg = DeviceBenchConfig(device=model_cfg.device, packed=model_cfg.packed)
        if quick:
            cfg.configs, cfg.seq_len, cfg.batch_size = ["configs/tiny-cpu.yaml"], 512, 1
            cfg.steps, cfg.warmup_steps = 2, 1
        return [cfg]
    if model_cfg.compile:
        return [DeviceBenchConfig(device="cpu", configs=[model_cfg.config], dtype="fp32", seq_len=model_cfg.seq_len,
                                  batch_size=model_cfg.batch_size, steps=model_cfg.steps,
                                  warmup_steps=max(2, model_cfg.warmup_steps), matmul_size=model_cfg.matmul_size,
                                  packed=model_cfg.packed)]
    return []


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> list[float]:
    """FLOP/s of an n x n x n matmul on `device` in `dtype` (2 n^3 FLOPs), one sample per repeat after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        samples.append(2 * n**3 / (time.perf_counter() - start))
    return samples


def step_batches(seq_len: int, batch: int, n_steps: int, packed: bool, device: torch.device) -> list[tuple]:
    """(input_ids, labels) per step. One running text: the same batch every step. Packed: each step its own
    windows of EOD-packed documents, so the concept counts vary from step to step as in training."""
    if not packed:
        data = torch.tensor(list(sample_text(batch * (seq_len + 1))), dtype=torch.long).view(batch, seq_len + 1)
        return [(data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device))] * n_steps
    windows = packed_windows(batch * n_steps, seq_len + 1).view(n_steps, batch, seq_len + 1)
    return [(w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)) for w in windows]


def step_throughput(model_cfg: ModelConfig, device: torch.device, dtype: str, seq_len: int, batch: int, steps: int,
                    warmup_steps: int, mode: str, packed: bool = False) -> dict:
    """Train `steps` + `warmup_steps` steps of a fresh model; times, realised compression, FLOPs and peak memory."""
    torch.manual_seed(0)
    batches = step_batches(seq_len, batch, warmup_steps + steps, packed, device)
    model = SynergyLM(model_cfg).to(device).train()
    if mode != "eager":
        compile_blocks(model, mode)
    settings = step_config(lr=0.0)
    loop = PlainLoop(model, model.param_groups(settings.optim.weight_decay), settings)
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def forward(batch_):
        with autocast:
            out = model(*batch_)
        return out.loss, float(out.stats.bytes_per_concept)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, realised = [], []
    for i, step_batch in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        bytes_per_concept = loop.step(0, [step_batch], forward)[0]
        synchronize(device)
        if i == 0:
            first_step = time.perf_counter() - start
        if i >= warmup_steps:
            seconds.append(time.perf_counter() - start)
            realised.append(bytes_per_concept)
    median_bpc = statistics.median(realised)
    innermost = median_bpc if model_cfg.stages else None  # a byte model has no concepts
    result = {
        "step_seconds": seconds,
        "bytes_per_s": [batch * seq_len / s for s in seconds],
        "first_step_seconds": first_step,
        "bytes_per_concept": median_bpc,
        "flops_per_byte": flops_per_byte(model_cfg, seq_len, innermost),
        "params": sum(p.numel() for p in model.parameters()),
        "plan_activations_gib": activation_bytes(model_cfg, seq_len, batch, dtype, False, innermost) / GiB,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    if mode != "eager":
        result.update(compile_counts())
    return result


def run(cfg: DeviceBenchConfig, command: str) -> BenchResults:
    device = torch.device(cfg.device)
    # on a GPU these are the model benchmark's rows; on the CPU they complement its comparison (--compile)
    report = BenchResults(name="model" if device.type != "cpu" else "model-compile", command=command)
    if device.type == "cpu":
        report.notes.append(f"process pinned to CPU {pin_to_one_core()}, torch threads {torch.get_num_threads()}")
    ceiling = figure_from("matmul_flops_per_s", matmul_ceiling(device, DTYPES[cfg.dtype], cfg.matmul_size),
                          "FLOP/s", f"{cfg.matmul_size}^3 {cfg.dtype} matmul on {cfg.device}, the MFU ceiling")
    report.add(ceiling)
    for path in cfg.configs:
        train_cfg = load_config(resolve(path))
        name = train_cfg.run.dir.rstrip("/").split("/")[-1] or path
        seq_len = cfg.seq_len or train_cfg.data.seq_len
        batch = cfg.batch_size or train_cfg.batch.micro_batch_size
        for mode in cfg.modes:
            key = f"{name}_{mode}"
            result = step_throughput(train_cfg.model, device, cfg.dtype, seq_len, batch, cfg.steps,
                                     cfg.warmup_steps, mode, cfg.packed)
            text = "windows of EOD-packed documents, new ones each step" if cfg.packed else "one running text"
            speed = report.add(figure_from(f"{key}_bytes_per_s", result["bytes_per_s"], "B/s",
                                           f"{batch} x {seq_len} bytes ({text}), {cfg.dtype}, {mode}, "
                                           f"{result['params'] / 1e6:.1f}M parameters, "
                                           f"{result['bytes_per_concept']:.2f} bytes per concept"))
            mfu = result["flops_per_byte"] * speed.value / ceiling.value
            report.add(Figure(f"{key}_mfu", 100 * mfu, "%", detail="model FLOPs per byte x bytes/s / matmul ceiling"))
            report.add(Figure(f"{key}_first_step_s", result["first_step_seconds"], "s",
                              detail="the first step, compilation included"))
            if "peak_memory_gib" in result:
                report.add(Figure(f"{key}_peak_memory_gib", result["peak_memory_gib"], "GiB",
                                  detail=f"torch.cuda.max_memory_allocated; synergy-plan's activation estimate "
                                         f"{result['plan_activations_gib']:.2f} GiB"))
            if "block_variants" in result:
                report.add(Figure(f"{key}_block_variants", result["block_variants"], "",
                                  detail=f"{result['compiled_graphs']} graphs"))
    report.notes.append(f"device {cfg.device}"
                        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
                        + f", torch {torch.__version__}, {cfg.warmup_steps} warm-up + {cfg.steps} timed steps")
    return report
