"""`synergy-bench model`: training-step speed and memory of SynergyLM against a plain byte Transformer.

One run, one core (pinned), same text, same sequence length; the models come from a training
config's `model:` section (`--config`, default configs/tiny-cpu.yaml):
- each model trains for a few steps (bench/loop.py: forward + backward + clipping + AdamW step with the
  library's optimizer settings) in its own fresh process, so
  its peak resident memory is its own; bytes/s = batch * seq_len / median step CPU time;
- the byte Transformer (the same config with no stages and a RoPE attention middle; the middle's
  heads, a width near the middle's) has the width/depth whose parameter count is the closest to SynergyLM's;
- two more steps per SynergyLM run under torch.profiler: the model labels each stage's routing
  (`synergy/stage{s}/route_down`: router + downsampling; `smooth_up`: smoothing + upsampling) and
  forward hooks label the middle network; backward time is attributed to a label through the
  autograd sequence numbers of its forward ops;
- the middle network is also timed alone (forward + backward on the realised number of concepts);
- a dense fp32 matmul measured in the same run is the FLOP/s ceiling for MFU;
- the cost of document isolation: the first SynergyLM row with `model.document_isolation` on and off, on
  windows that pack several documents between EODs (as training windows do), both models in one process
  with their steps alternated, so a shared machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace

import torch
import zstandard

from data_pipeline.vocab import EOD_ID
from synergy_dist import SAMPLE_CORPUS
from synergy_dist.bench.loop import PlainLoop
from synergy_dist.bench.paths import resolve
from synergy_dist.bench.results import BenchResults, Target, figure_from, missing, ratio
from synergy_dist.bench.timing import Stopwatch, peak_rss_kib, pin_to_one_core, rss_kib
from synergy_dist.config import Config, ScheduleConfig, TrainConfig, load_config
from synergy_dist.model import accounting
from synergy_dist.model.config import ModelConfig, RouterConfig, StackConfig
from synergy_dist.model.synergy import HierarchyStage, SynergyLM

SCOPE_PREFIX = "synergy/"  # the model's own profiler labels: synergy/stage{s}/route_down, synergy/stage{s}/smooth_up
ROUTING_SCOPES = ("route_down", "smooth_up")  # per stage: router + downsampling, smoothing + upsampling
MIDDLE_SCOPE = "middle"  # labelled by forward hooks on the middle network (bench's own label)
DEFAULT_CONFIG = "configs/tiny-cpu.yaml"
# rows of the comparison: name -> the fixed router (kind, stride) replacing stage 0's, or None for the config as written
SYNERGY_MODELS: dict[str, tuple[str, int] | None] = {
    "synergy-cosine": None,  # the config's model (tiny-cpu: learned cosine router, target N = 4)
    "synergy-stride4": ("stride", 4),  # same model, exactly N = 4
    "synergy-space": ("space", 4),  # same model, a concept per word (N ~ 5-6 on text)
}


@dataclass
class ModelBenchConfig:
    """Settings of one model benchmark run."""

    config: str = DEFAULT_CONFIG  # training YAML whose `model:` section is benchmarked (relative: cwd, else the repo)
    seq_len: int = 4096  # bytes per sequence
    batch_size: int = 1  # sequences per step
    steps: int = 4  # timed training steps per model (median reported)
    warmup_steps: int = 1  # untimed steps first (allocator, caches)
    synergy_models: list[str] = field(default_factory=lambda: list(SYNERGY_MODELS))  # rows from SYNERGY_MODELS
    matmul_size: int = 1024  # n of the n x n fp32 matmul that sets the FLOP/s ceiling
    lr: float = 0.0  # AdamW learning rate: 0 keeps the weights, hence a learned router's compression, fixed
    # while timing (the optimizer still does all of its arithmetic); > 0 lets the compression drift
    profile: bool = True  # run the profiled step that splits time into router / middle / rest


# ---------------------------------------------------------------------------------- helpers


def matmul_flops_per_s(n: int, repeats: int = 10) -> list[float]:
    """FLOP/s (per CPU second) of an n x n x n fp32 matmul on this thread (2 n^3 FLOPs), one per repeat."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    samples = []
    for _ in range(repeats):
        clock = Stopwatch()
        torch.mm(a, b, out=out)
        samples.append(2 * n**3 / clock.cpu())
    return samples


def load_model_config(path: str) -> ModelConfig:
    """The `model:` section of a training YAML (validated with the rest of the config)."""
    return load_config(resolve(path)).model


def with_fixed_router(base: ModelConfig, kind: str, stride: int) -> ModelConfig:
    """The same model with stage 0's router replaced by a fixed one ("stride" every k bytes, or "space")."""
    cfg = copy.deepcopy(base)
    cfg.stages[0].router = RouterConfig(kind=kind, stride=stride, target_bytes_per_concept=float(stride))
    cfg.validate()
    return cfg


def byte_transformer(base: ModelConfig, d_model: int, depth: int, n_heads: int) -> ModelConfig:
    """The plain byte-level Transformer of a config: no stages, the middle on bytes as `depth` RoPE attention layers."""
    cfg = replace(copy.deepcopy(base), stages=[], d_middle=d_model,
                  middle=StackConfig(pattern="A", repeat=depth, n_heads=n_heads, pos_encoding="rope"))
    cfg.validate()
    return cfg


def synergy_variant(base: ModelConfig, name: str) -> ModelConfig:
    """Row `name` of SYNERGY_MODELS built from the config's model."""
    router = SYNERGY_MODELS[name]
    return copy.deepcopy(base) if router is None else with_fixed_router(base, *router)


def count_params(cfg) -> int:
    return sum(p.numel() for p in SynergyLM(cfg).parameters())


def matched_byte_transformer(synergy_cfg, target_params: int, width_slack: int = 64) -> tuple[dict, int]:
    """The byte Transformer (the middle's heads, a width within +-width_slack of the middle's, in
    steps of 32) whose parameter count is the closest to target_params; ties go to the width
    nearest the middle's."""
    n_heads = synergy_cfg.middle.n_heads
    best: tuple[tuple[int, int], dict, int] | None = None
    for d_model in range(synergy_cfg.d_middle - width_slack, synergy_cfg.d_middle + width_slack + 1, 32):
        if d_model < 2 * n_heads or d_model % (2 * n_heads):  # RoPE needs an even head dim
            continue
        for depth in range(1, 65):
            kwargs = {"d_model": d_model, "depth": depth, "n_heads": n_heads}
            params = count_params(byte_transformer(synergy_cfg, **kwargs))
            score = (abs(params - target_params), abs(d_model - synergy_cfg.d_middle))
            if best is None or score < best[0]:
                best = (score, kwargs, params)
            if params > target_params:
                break
    assert best is not None, "no byte Transformer width fits the middle's heads"
    return best[1], best[2]


def sample_documents() -> list[bytes]:
    """The documents of the bundled sample corpus, UTF-8."""
    with open(SAMPLE_CORPUS, "rb") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        return [json.loads(line)["text"].encode("utf-8") for line in text if line.strip()]


def sample_text(n_bytes: int) -> bytes:
    """The first n_bytes of the bundled sample corpus (documents joined with newlines), repeated if short."""
    data = b"\n".join(sample_documents())
    return (data * (n_bytes // max(len(data), 1) + 1))[:n_bytes]


def packed_windows(batch: int, length: int) -> torch.Tensor:
    """(batch, length) ids: the sample corpus's documents, each cut to at most length // 4 bytes, each opened by
    EOD as the training stream packs them, so every window holds several document starts."""
    ids: list[int] = []
    docs = sample_documents()
    while len(ids) < batch * length:
        for doc in docs:
            ids += [EOD_ID, *doc[: max(1, length // 4)]]
    return torch.tensor(ids[: batch * length], dtype=torch.long).view(batch, length)


# ---------------------------------------------------------------------------------- profiling


def label_middle(model) -> list:
    """Label the middle network's forward in the profiler ("synergy/middle") with forward hooks; returns
    the hook handles (remove() them to stop). The model labels its routing itself."""
    middle = innermost_network(model)
    scopes = []

    def enter(module, args):
        scopes.append(torch.profiler.record_function(SCOPE_PREFIX + MIDDLE_SCOPE))
        scopes[-1].__enter__()

    def leave(module, args, output):
        scopes.pop().__exit__(None, None, None)

    return [middle.register_forward_pre_hook(enter), middle.register_forward_hook(leave)]


def scope_times(events) -> dict[str, float]:
    """Seconds per label under SCOPE_PREFIX, forward (the label's own span) + backward (autograd nodes of
    its forward ops); a label's name drops the prefix and any "stage{s}/" (stages add up).

    The profiler gives every forward op a sequence number; the backward node that autograd runs for
    it ("autograd::engine::evaluate_function: ...") carries the same number.
    """
    children: dict[int, list] = {}
    for event in events:
        if event.cpu_parent is not None:
            children.setdefault(id(event.cpu_parent), []).append(event)

    def sequence_numbers(event, found: set[int]) -> None:
        for child in children.get(id(event), []):
            if child.sequence_nr >= 0:
                found.add(child.sequence_nr)
            sequence_numbers(child, found)

    forward: dict[str, float] = {}
    seq_of: dict[str, set[int]] = {}
    for event in events:
        if event.name.startswith(SCOPE_PREFIX):
            name = event.name[len(SCOPE_PREFIX):].split("/")[-1]
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith(SCOPE_PREFIX):
                parent = parent.cpu_parent
            if parent is not None:
                continue  # nested inside another scope: counted there
            forward[name] = forward.get(name, 0.0) + event.cpu_time_total / 1e6
            sequence_numbers(event, seq_of.setdefault(name, set()))
    backward = {name: 0.0 for name in forward}
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function:"):
            for name, seqs in seq_of.items():
                if event.sequence_nr in seqs:
                    backward[name] += event.cpu_time_total / 1e6
    return {name: forward[name] + backward[name] for name in forward}


# ---------------------------------------------------------------------------------- one model


def innermost_network(model):
    """The middle Stack of a SynergyLM (for the byte Transformer: its whole body)."""
    node = model.body
    while isinstance(node, HierarchyStage):
        node = node.inner
    return node


def time_middle(model, batch: int, units: int, repeats: int = 3) -> list[float]:
    """CPU seconds of forward + backward of the middle network alone on (batch, units, d_middle) inputs."""
    middle = innermost_network(model)
    d = model.cfg.d_middle
    x = torch.randn(batch, units, d, requires_grad=True)
    grad = torch.randn(batch, units, d)
    valid = torch.ones(batch, units, dtype=torch.bool)
    seconds = []
    for _ in range(repeats + 1):  # the first run warms up
        clock = Stopwatch()
        y, _ = middle(x, valid)
        y.backward(grad)
        seconds.append(clock.cpu())
    return seconds[1:]


def step_config(lr: float) -> Config:
    """The timed step's settings: the library's AdamW defaults (betas, eps, weight decay, clipping) at a constant lr
    (not validated as a training config: lr 0, the default here, keeps the weights fixed)."""
    return Config(train=TrainConfig(lr=lr), schedule=ScheduleConfig(kind="constant", warmup_steps=0))


def realised_bytes_per_concept(out) -> float:
    """Bytes per concept the forward call realised (cumulative over the stages; 1 for a byte model)."""
    return float(out.stats.bytes_per_concept)


def train_steps(model_cfg: ModelConfig, cfg: ModelBenchConfig, profile: bool) -> dict:
    """Run in a fresh process: build the model, train, time each step, measure memory; returns a dict."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, L = cfg.batch_size, cfg.seq_len
    data = torch.tensor(list(sample_text(B * (L + 1))), dtype=torch.long).view(B, L + 1)
    input_ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    gc.collect()
    rss_before = rss_kib("VmRSS")

    model = SynergyLM(model_cfg)
    model.train()
    settings = step_config(cfg.lr)
    loop = PlainLoop(model, model.param_groups(settings.optim.weight_decay), settings)

    def forward(batch):
        out = model(*batch)
        return out.loss, realised_bytes_per_concept(out)

    def step() -> float:
        return loop.step(0, [(input_ids, labels)], forward)[0]

    for _ in range(cfg.warmup_steps):
        step()
    seconds, wall_seconds = [], []
    bytes_per_concept = []
    for _ in range(cfg.steps):
        clock = Stopwatch()
        realised = step()
        seconds.append(clock.cpu())
        wall_seconds.append(clock.wall())
        bytes_per_concept.append(realised)
    result = {
        "step_seconds": seconds,
        "bytes_per_s": [B * L / s for s in seconds],
        "wall_bytes_per_s": [B * L / s for s in wall_seconds],
        "bytes_per_concept": bytes_per_concept,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_added_mb": (peak_rss_kib(rss_before) - rss_before) / 1024,
    }
    result.update(_flops(model_cfg, L, B, bytes_per_concept))
    units = max(1, round(L / statistics.median(bytes_per_concept))) if model_cfg.stages else L
    result["middle_units"] = units
    result["middle_seconds"] = time_middle(model, B, units)
    if profile and model_cfg.stages:
        label_middle(model)
        result["profiled_step_seconds"], result["scope_seconds"] = [], []
        for _ in range(2):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                clock = Stopwatch()
                step()
                result["profiled_step_seconds"].append(clock.wall())  # profiler event times are wall clock too
            result["scope_seconds"].append(scope_times(prof.events()))
    return result


def isolation_steps(model_cfg: ModelConfig, cfg: ModelBenchConfig) -> dict:
    """Run in a fresh process: the model with document isolation on and off (same weights), training steps
    alternated on the same EOD-packed windows; returns bytes per CPU second of each and EODs per window."""
    torch.set_num_threads(1)
    B, L = cfg.batch_size, cfg.seq_len
    data = packed_windows(B, L + 1)
    input_ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    settings = step_config(cfg.lr)
    loops = {}
    for isolated in (True, False):
        torch.manual_seed(0)
        model = SynergyLM(replace(copy.deepcopy(model_cfg), document_isolation=isolated)).train()
        loops[isolated] = (model, PlainLoop(model, model.param_groups(settings.optim.weight_decay), settings))

    def step(isolated: bool) -> None:
        model, loop = loops[isolated]
        loop.step(0, [(input_ids, labels)], lambda batch: (model(*batch).loss, None))

    seconds: dict[bool, list[float]] = {True: [], False: []}
    for i in range(cfg.warmup_steps + cfg.steps):
        for isolated in (True, False):
            clock = Stopwatch()
            step(isolated)
            if i >= cfg.warmup_steps:
                seconds[isolated].append(clock.cpu())
    return {"on": [B * L / s for s in seconds[True]], "off": [B * L / s for s in seconds[False]],
            "eods_per_window": float((input_ids == EOD_ID).sum()) / B}


def _flops(model_cfg, seq_len: int, batch: int, bytes_per_concept: list[float]) -> dict:
    """Training FLOPs per step (forward + backward = 3x forward) from the model's accounting."""
    n = statistics.median(bytes_per_concept) if model_cfg.stages else 1.0
    n = max(n, 1.0)
    parts = accounting.flops_breakdown(model_cfg, seq_len, n)
    return {
        "flops_per_step": accounting.flops_per_byte(model_cfg, seq_len, n, training=True) * seq_len * batch,
        "middle_flops_per_step": 3 * parts["middle"] * seq_len * batch,
    }


def worker_main() -> None:
    """Entry point of the per-model subprocess: argv[1] is a JSON job, the result is printed as JSON."""
    job = json.loads(sys.argv[1])
    cfg = ModelBenchConfig(**job["cfg"])
    if job.get("isolation"):
        print(json.dumps(isolation_steps(ModelConfig(**job["model"]), cfg)))
    else:
        print(json.dumps(train_steps(ModelConfig(**job["model"]), cfg, job["profile"])))


def run_model(name: str, model_cfg: ModelConfig, cfg: ModelBenchConfig, profile: bool,
              isolation: bool = False) -> tuple[dict | None, str]:
    """One worker process: train_steps (or isolation_steps with isolation=True); returns (result, failure reason)."""
    job = json.dumps({"model": asdict(model_cfg), "cfg": asdict(cfg), "profile": profile, "isolation": isolation})
    code = "from synergy_dist.bench.model import worker_main; worker_main()"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, job], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"{name} exited with {proc.returncode}: {tail}"
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), ""


# ---------------------------------------------------------------------------------- the benchmark


def run(cfg: ModelBenchConfig, command: str) -> BenchResults:
    report = BenchResults(name="model", command=command)
    cpu = pin_to_one_core()
    report.notes.append(f"process pinned to CPU {cpu}; each model trains in its own subprocess on that CPU "
                        f"(torch threads 1); batch {cfg.batch_size} x seq_len {cfg.seq_len}, AdamW, "
                        f"{cfg.warmup_steps} warm-up + {cfg.steps} timed steps, lr {cfg.lr} (0: weights and router "
                        "compression fixed, optimizer arithmetic still runs); text: bundled sample corpus")
    ceiling = matmul_flops_per_s(cfg.matmul_size)
    report.add(figure_from("matmul_ceiling", [c / 1e9 for c in ceiling], "GFLOP/s",
                           f"fp32 torch.mm {cfg.matmul_size}^3, one thread, per CPU second"))
    report.notes.append("bytes/s, MFU and the matmul ceiling use process CPU time (the machine is shared: wall "
                        "time includes other processes' turns); *_wall figures give wall-clock bytes/s")

    base = load_model_config(cfg.config)
    if not base.stages:
        raise ValueError(f"model benchmark: {cfg.config} has no hierarchy stages (model.stages=[]); pass a "
                         "SynergyLM config with --config (e.g. configs/tiny-cpu.yaml)")
    report.notes.append(f"models: the `model:` section of {cfg.config}; the rows replace stage 0's router, the byte "
                        "Transformer is the same config with no stages and a RoPE attention middle")
    baseline = None
    for name in cfg.synergy_models:
        model_cfg = synergy_variant(base, name)
        synergy, reason = run_model(name, model_cfg, cfg, cfg.profile)
        key = name.replace("-", "_")
        if synergy is None:
            report.add(missing(f"{key}_bytes_per_s", "B/s", reason))
            continue
        baseline = baseline or (model_cfg, synergy["params"])
        router = SYNERGY_MODELS[name]
        what = "as configured" if router is None else f"stage 0 router {router[0]}, stride {router[1]}"
        _add_model_figures(report, key, synergy, f"SynergyLM {name} ({cfg.config}, {what})")
        report.add(figure_from(f"{key}_bytes_per_concept", synergy["bytes_per_concept"], "bytes",
                               "realised compression during the timed steps"))
        _add_middle_mfu(report, key, synergy, report.value("matmul_ceiling"))
        _add_routing_share(report, key, synergy)

    _add_isolation_cost(report, base, cfg)
    if baseline is None:
        report.add(missing("byte_transformer_bytes_per_s", "B/s", "no SynergyLM ran, nothing to match"))
        return report
    baselines = {"byte_transformer": matched_byte_transformer(*baseline),
                 "byte_transformer_same_width": matched_byte_transformer(*baseline, width_slack=0)}
    if baselines["byte_transformer_same_width"][0] == baselines["byte_transformer"][0]:
        del baselines["byte_transformer_same_width"]
    for key, (kwargs, params) in baselines.items():
        report.notes.append(f"{key}: {kwargs} -> {params:,} parameters (SynergyLM: {baseline[1]:,})")
        byte_tf, reason = run_model(key, byte_transformer(base, **kwargs), cfg, profile=False)
        if byte_tf is None:
            report.add(missing(f"{key}_bytes_per_s", "B/s", reason))
            continue
        _add_model_figures(report, key, byte_tf, f"byte Transformer {kwargs}")
        _add_middle_mfu(report, key, byte_tf, report.value("matmul_ceiling"))

    labels = {"byte_transformer": "byte Transformer (closest parameter count)",
              "byte_transformer_same_width": "byte Transformer at the middle's width"}
    for name in cfg.synergy_models:
        key = name.replace("-", "_")
        for baseline_key in baselines:
            report.targets.append(Target(f"{name} bytes/s vs {labels[baseline_key]}",
                                         ratio(report.value(f"{key}_bytes_per_s"),
                                               report.value(f"{baseline_key}_bytes_per_s")), ">=", 1.5))
        report.targets.append(Target(f"{name} router + down/upsampling share of step time",
                                     report.value(f"{key}_routing_share"), "<", 10.0, "%"))
        report.targets.append(Target(f"{name} middle-network MFU vs dense matmul ceiling",
                                     report.value(f"{key}_middle_mfu"), ">=", 30.0, "%"))
    return report


def _add_isolation_cost(report: BenchResults, base: ModelConfig, cfg: ModelBenchConfig) -> None:
    """Bytes/s of the first SynergyLM row with and without document isolation (same process, alternated steps)."""
    name = cfg.synergy_models[0]
    result, reason = run_model(name, synergy_variant(base, name), cfg, profile=False, isolation=True)
    if result is None:
        report.add(missing("isolation_on_bytes_per_s", "B/s", reason))
        return
    what = (f"SynergyLM {name}, windows of EOD-packed sample documents cut to <= seq_len/4 bytes "
            f"({result['eods_per_window']:.1f} EODs per window), steps alternated with the other setting")
    on = report.add(figure_from("isolation_on_bytes_per_s", result["on"], "B/s", f"document isolation on: {what}"))
    off = report.add(figure_from("isolation_off_bytes_per_s", result["off"], "B/s", f"document isolation off: {what}"))
    report.add(figure_from("isolation_speed_ratio", [a / b for a, b in zip(result["on"], result["off"])], "x",
                           "bytes/s with document isolation / without, per pair of alternated steps"))
    report.targets.append(Target(f"{name} bytes/s with document isolation vs without",
                                 ratio(on.value, off.value), ">=", 0.90))


def _add_model_figures(report: BenchResults, key: str, result: dict, what: str) -> None:
    report.add(figure_from(f"{key}_bytes_per_s", result["bytes_per_s"], "B/s",
                           f"{what}, {result['params']:,} parameters, training-step bytes per CPU second"))
    report.add(figure_from(f"{key}_bytes_per_s_wall", result["wall_bytes_per_s"], "B/s", "the same, wall clock"))
    report.add(figure_from(f"{key}_peak_rss_added", [result["peak_rss_added_mb"]], "MB",
                           "VmHWM after the steps - VmRSS before building the model"))
    flops = result.get("flops_per_step")
    ceiling = report.value("matmul_ceiling")
    if flops and ceiling:
        mfu = [100 * flops / s / (ceiling * 1e9) for s in result["step_seconds"]]
        report.add(figure_from(f"{key}_model_mfu", mfu, "%",
                               "accounting training FLOPs (3x forward) / step CPU time / ceiling"))


def _add_middle_mfu(report: BenchResults, key: str, result: dict, ceiling_gflops: float | None) -> None:
    middle_flops = result.get("middle_flops_per_step")
    if middle_flops and ceiling_gflops:
        mfu = [100 * middle_flops / s / (ceiling_gflops * 1e9) for s in result["middle_seconds"]]
        report.add(figure_from(f"{key}_middle_mfu", mfu, "%",
                               f"middle network alone, forward + backward on ({result['middle_units']} concepts x "
                               "d_middle): accounting training FLOPs (3x forward) / CPU time / ceiling"))
    else:
        report.add(missing(f"{key}_middle_mfu", "%", "middle FLOPs or the ceiling not available"))


def _add_routing_share(report: BenchResults, key: str, result: dict) -> None:
    profiles = result.get("scope_seconds")
    if not profiles:
        report.add(missing(f"{key}_routing_share", "%", "no profiled step (model without stages or --no-profile)"))
        return
    shares = []
    for scopes, step in zip(profiles, result["profiled_step_seconds"]):
        shares.append(100 * sum(scopes.get(name, 0.0) for name in ROUTING_SCOPES) / step)
    scopes, step = profiles[-1], result["profiled_step_seconds"][-1]
    breakdown = ", ".join(f"{name} {100 * scopes[name] / step:.1f}%" for name in sorted(scopes))
    report.add(figure_from(f"{key}_routing_share", shares, "%",
                           f"torch.profiler, forward + backward of the model's route_down + smooth_up labels (router, "
                           f"down/upsampling, smoothing) / whole step (incl. AdamW); "
                           f"last profiled step {step:.2f} s: {breakdown}"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="YAML",
                        help=f"training config whose model: section is benchmarked (default {DEFAULT_CONFIG})")
    parser.add_argument("--seq-len", type=int, default=None, help="model benchmark sequence length (default 4096)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per model (default 4)")
    parser.add_argument("--synergy-model", action="append", default=None, choices=list(SYNERGY_MODELS),
                        help=f"SynergyLM row(s) to compare (default: all of {list(SYNERGY_MODELS)})")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate of the timed steps (default 0: weights and compression stay fixed)")


def config_from_args(args: argparse.Namespace) -> ModelBenchConfig:
    cfg = ModelBenchConfig()
    if args.quick:  # a smoke run of the harness
        cfg.seq_len, cfg.steps, cfg.warmup_steps, cfg.matmul_size = 256, 2, 1, 256
    if getattr(args, "config", None):
        cfg.config = args.config
    if args.seq_len is not None:
        cfg.seq_len = args.seq_len
    if args.steps is not None:
        cfg.steps = args.steps
    if args.synergy_model:
        cfg.synergy_models = list(args.synergy_model)
    if args.lr is not None:
        cfg.lr = args.lr
    for key in ("seq_len", "steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"model benchmark: --{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    return cfg
