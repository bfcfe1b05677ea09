"""The one typed training configuration: dataclasses, YAML loading, dotted overrides, validation.

    cfg = load_config("configs/tiny-cpu.yaml",
                      ["train.lr=3e-4", "model.middle.repeat=12", "model.stages.0.router.kind=gate"])

Every knob has a default here; YAML files and command-line overrides only change values. Anything
that is wrong (unknown key, bad type, bad value, inconsistent combination) raises ConfigError naming
the key and the fix, before any compute starts.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synergy_dist.model.config import ModelConfig


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: checkpoints, metrics.jsonl, config.yaml, logs
    name: str = ""  # human-readable run name (default: the run directory's name)


@dataclass
class DataConfig:
    sources: list = field(default_factory=list)  # shard-set dirs; empty = the bundled sample corpus
    weights: list = field(default_factory=list)  # mixing weight per source (empty = proportional to size)
    valid_sources: list = field(default_factory=list)  # validation shard-set dirs (empty = sample's valid split)
    seq_len: int = 512  # bytes per training window
    num_workers: int = 0  # DataLoader worker processes per rank
    pack: bool = True  # pack documents with EOD separators (False: one document per window + padding)
    on_corrupt: str = "error"  # a damaged shard: "error" stops the run (exit 65), "skip" trains without that shard
    sample_dir: str = ""  # where the bundled sample is preprocessed ("" = ~/.cache/synergy_dist/sample)
    sample_valid_fraction: float = 0.05  # fraction of sample documents held out for validation


@dataclass
class OptimConfig:
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay (not applied to norms/biases/embeddings)
    grad_clip: float = 1.0  # clip the global grad norm to this (0 = no clipping)


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant" (after warmup)
    warmup_steps: int = 100  # linear warmup from 0 to train.lr
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * train.lr
    decay_fraction: float = 0.2  # wsd only: fraction of train.max_steps spent in the final decay


@dataclass
class BatchConfig:
    global_batch_size: int = 8  # sequences per optimizer step over all ranks (0 = derive from global_batch_bytes)
    global_batch_bytes: int = 0  # alternative: bytes per optimizer step (must be a multiple of data.seq_len)
    micro_batch_size: int = 1  # sequences per rank per forward/backward; accumulation is derived


@dataclass
class PrecisionConfig:
    dtype: str = "auto"  # "auto" (bf16 on GPUs that support it, else fp32) | "fp32" | "bf16" | "fp16"
    initial_loss_scale_power: int = 16  # fp16 only: initial dynamic loss scale = 2**this
    loss_scale_window: int = 1000  # fp16 only: steps without overflow before the scale grows


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage 0-3 (3 is incompatible with MoE layers)
    offload_optimizer: bool = False  # ZeRO-1/2/3: keep optimizer state on the CPU
    offload_param: bool = False  # ZeRO-3: keep parameters on the CPU
    expert_parallel_size: int = 1  # MoE experts split across this many ranks (must divide world size)
    activation_checkpointing: bool = False  # recompute dense blocks in backward to save memory (MoE blocks are kept)
    extra_json: str = ""  # path of a DeepSpeed JSON merged over the generated config
    extra: dict = field(default_factory=dict)  # DeepSpeed keys merged over the generated config (after extra_json)


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # save every N optimizer steps (0 = only at the end / on a signal)
    keep_last: int = 2  # keep the newest K complete checkpoints
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of M (0 = none)
    save_at_end: bool = True  # save when train.max_steps is reached
    verify: bool = True  # check sizes and CRC32 of every file before loading a checkpoint
    resume: bool = True  # resume from the newest complete checkpoint in run.dir/checkpoints


@dataclass
class LogConfig:
    every_steps: int = 10  # write metrics.jsonl / TensorBoard / console every N steps
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed
    console: bool = True  # print a progress line with ETA on rank 0
    wandb: bool = False  # also send the metrics to Weights & Biases (rank 0; needs the wandb extra)
    wandb_project: str = "synergy-dist"  # W&B project of the run
    wandb_run_name: str = ""  # W&B display name ("" = the run directory's name); the run id is in RUN_DIR/wandb_run_id


@dataclass
class SafeguardConfig:
    skip_nonfinite: bool = True  # skip the update when the loss or grad norm is NaN/Inf
    # a loss or grad norm this many robust std devs (1.4826 x MAD) above the window's median is a spike (0 = off) ...
    spike_zscore: float = 6.0
    spike_ratio: float = 4.5  # ... when it is also more than this many times that median (ordinary noise is not)
    spike_window: int = 100  # steps of running statistics for the spike test
    spike_min_history: int = 50  # applied steps needed before spikes are detected (early training is noisy)
    max_consecutive_spikes: int = 3  # this many spikes in a row -> roll back to the last good checkpoint
    # alarm if bytes/concept / target leaves [lo, hi]
    compression_band: list = field(default_factory=lambda: [0.5, 2.0])
    min_load_entropy_ratio: float = 0.5  # alarm if expert load entropy / log(n_experts) falls below this
    dead_expert_fraction: float = 0.01  # an expert with less than this share of mean load counts as dead


# torch.compile backends for train.compile: inductor generates kernels; aot_eager only captures graphs (tests)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps in total
    lr: float = 3e-4  # peak learning rate (per-part lr_mult from the model applies on top)
    eval_every_steps: int = 0  # evaluate bits per byte on the validation set every N steps (0 = off)
    eval_batches: int = 4  # batches of batch.micro_batch_size validation windows per rank per evaluation; 0 = all
    sample_bytes: int = 200  # bytes generated from sample_prompt at the end (0 = none)
    sample_prompt: str = "The "  # prompt for the final sample generation
    threads: int = 0  # torch intra-op threads per process (0 = leave torch's default / OMP_NUM_THREADS)
    compile: bool = False  # torch.compile every block (train/compile.py); routing and cached generation stay eager
    compile_backend: str = "inductor"  # "inductor" (generated kernels) | "aot_eager" (capture only, for tests)
    # Watchdog (synergy_dist/train/watchdog.py): a training step that runs past its limit dumps every thread's
    # stack and exits with 76. Checkpoint saves and evaluations are not steps and are never timed.
    watchdog_s: float = 1800.0  # no step may take longer than this, first steps included (0 = no absolute limit)
    watchdog_factor: float = 20.0  # after warm-up, nor longer than this x the median step (0 = no relative limit)
    watchdog_warmup_steps: int = 20  # steps this process trains before the relative limit applies
    watchdog_min_s: float = 300.0  # the relative limit is never below this (a recompilation is not a hang)


@dataclass
class DistributedConfig:
    # A collective waits at most this long for the other ranks (torch.distributed's process-group timeout),
    # then raises: a dead or stuck rank cannot leave the others waiting forever.
    timeout_s: float = 600.0


@dataclass
class DebugConfig:
    # Fault injection for tests (applied by synergy_dist/train/fault_injection.py). Faults are keyed by
    # global batch of the data stream (1-based), so a "poisoned batch" stays poisoned, and a rollback
    # that skips past it leaves it behind.
    nan_loss_batches: list = field(default_factory=list)  # make the loss NaN on these batches
    inf_grad_batches: list = field(default_factory=list)  # make the gradients Inf (loss stays finite) on these batches
    spike_loss_batches: list = field(default_factory=list)  # multiply the loss by spike_factor on these batches
    # multiply the gradients (not the loss) by spike_factor on these batches
    spike_grad_batches: list = field(default_factory=list)
    spike_factor: float = 100.0  # loss / gradient multiplier used by spike_loss_batches and spike_grad_batches
    kill_in_save_at_step: int = 0  # SIGKILL this process half-way through saving the checkpoint of this step
    hang_after_step: int = 0  # wait (up to 10 min, or until SIGTERM/SIGUSR1) after this step, for a test's kill -9
    stall_batches: list = field(default_factory=list)  # stall inside the step of these batches (up to 10 min)
    stall_rank: int = -1  # the rank that stalls on stall_batches (-1 = every rank)
    step_sleep_s: float = 0.0  # sleep this long after every step (a slow run, e.g. to meet a SLURM time limit)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)  # where the run lives
    model: ModelConfig = field(default_factory=ModelConfig)  # stages, middle, widths (synergy_dist/model/config.py)
    data: DataConfig = field(default_factory=DataConfig)  # shard sets, window length, loader workers
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and clipping
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # learning-rate shape
    batch: BatchConfig = field(default_factory=BatchConfig)  # global batch and micro-batch
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)  # fp32 / bf16 / fp16
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # ZeRO, offload, expert parallelism
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # collective timeout
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving, retention, resume
    log: LogConfig = field(default_factory=LogConfig)  # metrics.jsonl, TensorBoard, console
    safeguards: SafeguardConfig = field(default_factory=SafeguardConfig)  # NaN/spike skips, rollback, alarms
    train: TrainConfig = field(default_factory=TrainConfig)  # step budget, peak lr, evaluation, final sample
    debug: DebugConfig = field(default_factory=DebugConfig)  # fault injection for tests
    seed: int = 0  # seeds model init, data order and every rank's random generators

    # ----- derived values -----
    def global_batch_sequences(self) -> int:
        if self.batch.global_batch_size > 0:
            return self.batch.global_batch_size
        return self.batch.global_batch_bytes // self.data.seq_len

    def grad_accumulation_steps(self, world_size: int) -> int:
        return self.global_batch_sequences() // (world_size * self.batch.micro_batch_size)

    def to_dict(self) -> dict:
        return to_plain(self)


# ----------------------------------------------------------------------------- building


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, key: str, base: Any = None) -> Any:
    """Convert a YAML/override value to the field's type, or fail naming the key.

    For a nested section, `base` is the parent's default for it, so a partial mapping only changes
    the keys it names (model.middle.repeat=12 keeps the middle's other preset values)."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of its sub-keys, got {value!r}")
        return _build(hint, value, key, base if isinstance(base, hint) else None)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' has value {value!r}; expected one of {args}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"config key '{key}' is out of range: {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        item = (typing.get_args(hint) or [None])[0]
        if dataclasses.is_dataclass(item):  # e.g. model.stages: each item's keys get their types checked too
            return [_typed_item(item, v, f"{key}.{i}") for i, v in enumerate(value)]
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(value)
    return value


def _typed_item(cls: type, value: Any, key: str) -> Any:
    """A list item of dataclass type `cls` with every value converted to its field's type (or a
    ConfigError naming the key); still a mapping, so the class's own constructor fills the defaults."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' must be a mapping of its sub-keys, got {value!r}")
    types_by_name = _field_types(cls)
    typed = {}
    for name, v in value.items():
        dotted = f"{key}.{name}"
        if name not in types_by_name:
            raise ConfigError(f"unknown config key '{dotted}'; known keys here: {', '.join(sorted(types_by_name))}")
        hint = types_by_name[name]
        nested = dataclasses.is_dataclass(hint) and isinstance(v, dict)
        typed[name] = _typed_item(hint, v, dotted) if nested else _coerce(v, hint, dotted)
    return typed


def _build(cls: type, values: dict, prefix: str, base: Any = None) -> Any:
    types_by_name = _field_types(cls)
    if base is None:
        try:
            base = cls()
        except Exception:  # a class without usable defaults: build from the given keys only
            base = None
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_by_name:
            known = ", ".join(sorted(types_by_name))
            raise ConfigError(f"unknown config key '{dotted}'; known keys here: {known}")
        kwargs[key] = _coerce(value, types_by_name[key], dotted, getattr(base, key, None))
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError) as err:  # the model's own validation names its key
        raise ConfigError(f"invalid config under '{prefix or 'config'}': {err}") from err


def to_plain(obj: Any) -> Any:
    """Dataclasses -> plain dicts/lists (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4); the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub_key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; write it as key.sub_key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    if isinstance(value, str):  # YAML reads 3e-4 as a string; accept plain float syntax too
        try:
            value = float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
        except ValueError:
            pass
    return key.split("."), value


def _list_index(items: list, part: str, where: str, text: str) -> int:
    """The item index `part` names in the list at `where`, or a ConfigError saying why it names none."""
    if not part.isdigit():
        raise ConfigError(f"override '{text}': {where} is a list; '{part}' is not an item index "
                          f"(write {where}.0 for its first item)")
    index = int(part)
    if index >= len(items):
        span = f"(indices 0..{len(items) - 1})" if items else f"(replace the whole list: {where}=[...])"
        raise ConfigError(f"override '{text}': {where} has {len(items)} item(s) {span}")
    return index


_MISSING = object()


def _default_at(path: list[str]) -> Any:
    """The plain default value at a dotted path (list items by index), or _MISSING."""
    node: Any = to_plain(Config())
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _set_dotted(tree: dict, path: list[str], value: Any, text: str) -> None:
    """tree[path] = value, where a numeric part indexes a list (model.stages.0.router.kind=gate).

    A list the tree does not hold yet is first copied from the defaults, so an item override changes
    that item's named key only; naming the list itself replaces it whole (data.sources=[a, b])."""
    node: Any = tree
    for depth, part in enumerate(path):
        key: Any = _list_index(node, part, ".".join(path[:depth]), text) if isinstance(node, list) else part
        if depth == len(path) - 1:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            default = _default_at(path[: depth + 1])
            if isinstance(default, list):
                child = node[key] = copy.deepcopy(default)
            elif default is None or default is _MISSING or isinstance(default, dict):
                child = node[key] = {}
            else:
                child = default  # a value: reported just below
        if not isinstance(child, (dict, list)):
            where, below = ".".join(path[: depth + 1]), path[depth + 1]
            if below.isdigit():
                raise ConfigError(f"override '{text}': {where} is a value, not a list; it has no item {below}")
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is a value, not a section")
        node = child


def config_from_dict(values: dict, overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from nested dicts plus dotted overrides."""
    tree = json.loads(json.dumps(values or {}))  # deep copy of plain data
    for text in overrides or []:
        path, value = parse_override(text)
        _set_dotted(tree, path, value, text)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file (or none: all defaults), apply overrides, validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file '{path}' is a directory; pass a YAML file with --config")
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file with --config")
        try:
            values = yaml.safe_load(path.read_bytes()) or {}  # bytes: YAML's reader reports bad encodings
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from err
        except OSError as err:
            raise ConfigError(f"config file '{path}' cannot be read ({err.strerror})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (run:, model:, train:, ...)")
    return config_from_dict(values, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def model_stacks(model_cfg: ModelConfig) -> list:
    """Every layer stack of the model config (stage encoders/decoders and the middle)."""
    stacks = [model_cfg.middle]
    for stage in model_cfg.stages:
        stacks += [stage.encoder, stage.decoder]
    return stacks


def has_moe_layers(model_cfg: ModelConfig) -> bool:
    return any(stack.moe_layer_indices() for stack in model_stacks(model_cfg))


def set_expert_parallel_size(cfg: Config, ep: int) -> None:
    """Set the expert-parallel size everywhere the config holds it: the deepspeed section and every
    stack's MoE config (the model builds each rank's expert bank from the latter)."""
    cfg.deepspeed.expert_parallel_size = ep
    for stack in model_stacks(cfg.model):
        stack.moe.expert_parallel_size = ep


_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "batch.global_batch_size", "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.global_batch_size", "optimizer": "optim.* and train.lr",
    "scheduler": "schedule.*",
}


def _check_deepspeed_extra(where: str, extra: dict, zero_stage: int) -> None:
    """Extra DeepSpeed JSON may tune DeepSpeed, not contradict what the trainer derives from the config."""
    for key, ours in _OWNED_DEEPSPEED_KEYS.items():
        _require(key not in extra, f"{where} sets '{key}', which the trainer derives; set {ours} instead")
    stage = extra.get("zero_optimization", {}).get("stage", zero_stage)
    _require(stage == zero_stage, f"{where} sets zero_optimization.stage={stage} but deepspeed.zero_stage="
                                  f"{zero_stage}; set deepspeed.zero_stage={stage} (the trainer's checks use it)")


def validate(cfg: Config) -> None:
    """Checks that need no world size (the trainer calls validate_for_world once ranks are known)."""
    d, b, o, s, p, z, c, lg, sg, t = (cfg.data, cfg.batch, cfg.optim, cfg.schedule, cfg.precision,
                                      cfg.deepspeed, cfg.checkpoint, cfg.log, cfg.safeguards, cfg.train)
    _require(bool(cfg.run.dir), "run.dir is empty; set it to the run directory, e.g. run.dir=runs/my-run")
    _require(d.seq_len >= 8, f"data.seq_len={d.seq_len} is too small; use at least 8 (e.g. data.seq_len=512)")
    _require(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
    if d.on_corrupt == "raise":  # the name before 'error' (configs of earlier runs keep working)
        d.on_corrupt = "error"
    _require(d.on_corrupt in ("error", "skip"), f"data.on_corrupt='{d.on_corrupt}' must be 'error' or 'skip'")
    _require(0.0 < d.sample_valid_fraction < 1.0,
             f"data.sample_valid_fraction={d.sample_valid_fraction} must be between 0 and 1 (e.g. 0.05)")
    if d.weights:
        _require(len(d.weights) == len(d.sources),
                 f"data.weights has {len(d.weights)} entries but data.sources has {len(d.sources)}; "
                 "give one weight per source or leave data.weights empty")
        _require(all(isinstance(w, (int, float)) and w > 0 for w in d.weights),
                 f"data.weights={d.weights} must all be positive numbers")
    _require(b.micro_batch_size >= 1, f"batch.micro_batch_size={b.micro_batch_size} must be >= 1")
    _require(b.global_batch_size >= 0 and b.global_batch_bytes >= 0,
             "batch.global_batch_size and batch.global_batch_bytes must be >= 0")
    _require((b.global_batch_size > 0) != (b.global_batch_bytes > 0),
             "set exactly one of batch.global_batch_size (sequences) and batch.global_batch_bytes "
             "(bytes); set the other to 0")
    if b.global_batch_bytes:
        _require(b.global_batch_bytes % d.seq_len == 0,
                 f"batch.global_batch_bytes={b.global_batch_bytes} is not a multiple of data.seq_len={d.seq_len}; "
                 f"use a multiple such as {max(1, b.global_batch_bytes // d.seq_len) * d.seq_len}")
    _require(t.lr > 0 and math.isfinite(t.lr), f"train.lr={t.lr} must be a positive number (e.g. train.lr=3e-4)")
    _require(t.max_steps >= 1, f"train.max_steps={t.max_steps} must be >= 1")
    _require(t.eval_every_steps >= 0 and t.eval_batches >= 0,
             "train.eval_every_steps must be >= 0 and train.eval_batches >= 0 (0 = the whole validation set)")
    _require(t.sample_bytes >= 0, f"train.sample_bytes={t.sample_bytes} must be >= 0")
    _require(t.threads >= 0, f"train.threads={t.threads} must be >= 0")
    _require(t.watchdog_s >= 0 and t.watchdog_factor >= 0 and t.watchdog_min_s >= 0 and t.watchdog_warmup_steps >= 1,
             "train.watchdog_s, train.watchdog_factor and train.watchdog_min_s must be >= 0 (0 = off) and "
             "train.watchdog_warmup_steps >= 1")
    _require(cfg.distributed.timeout_s > 0,
             f"distributed.timeout_s={cfg.distributed.timeout_s} must be > 0 (seconds, e.g. distributed.timeout_s=600)")
    _require(len(o.betas) == 2 and all(0.0 <= x < 1.0 for x in o.betas),
             f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    _require(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    _require(s.kind in ("cosine", "wsd", "constant"),
             f"schedule.kind='{s.kind}' is unknown; use 'cosine', 'wsd' or 'constant'")
    _require(s.warmup_steps >= 0, f"schedule.warmup_steps={s.warmup_steps} must be >= 0")
    _require(0.0 <= s.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
    _require(0.0 < s.decay_fraction <= 1.0, f"schedule.decay_fraction={s.decay_fraction} must be in (0, 1]")
    _require(p.dtype in ("auto", "fp32", "bf16", "fp16"),
             f"precision.dtype='{p.dtype}' is unknown; use 'auto', 'fp32', 'bf16' or 'fp16'")
    _require(z.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={z.zero_stage} must be 0, 1, 2 or 3")
    _require(cfg.train.compile_backend in COMPILE_BACKENDS, f"train.compile_backend={cfg.train.compile_backend!r} "
             f"is not supported; use one of {', '.join(COMPILE_BACKENDS)}")
    _require(z.expert_parallel_size >= 1, f"deepspeed.expert_parallel_size={z.expert_parallel_size} must be >= 1")
    _require(not z.offload_optimizer or z.zero_stage >= 1,
             "deepspeed.offload_optimizer needs ZeRO; set deepspeed.zero_stage to 1, 2 or 3")
    _require(not z.offload_param or z.zero_stage == 3,
             "deepspeed.offload_param needs ZeRO-3; set deepspeed.zero_stage=3 or deepspeed.offload_param=false")
    if z.extra_json:
        _require(Path(z.extra_json).is_file(),
                 f"deepspeed.extra_json='{z.extra_json}' does not exist; give the path of a DeepSpeed JSON file")
        try:
            extra = json.loads(Path(z.extra_json).read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.extra_json='{z.extra_json}' is not valid JSON: {err}") from err
        _require(isinstance(extra, dict), f"deepspeed.extra_json='{z.extra_json}' must hold a JSON object")
        _check_deepspeed_extra(f"deepspeed.extra_json='{z.extra_json}'", extra, z.zero_stage)
    _check_deepspeed_extra("deepspeed.extra", z.extra, z.zero_stage)
    has_moe = has_moe_layers(cfg.model)
    if has_moe:
        _require(z.zero_stage != 3,
                 "deepspeed.zero_stage=3 cannot be used with MoE layers (DeepSpeed refuses native MoE under "
                 "ZeRO-3); use deepspeed.zero_stage=2 or a model without MoE layers")
        _require(p.dtype != "fp16",
                 "precision.dtype='fp16' cannot be used with MoE layers (their routers must stay fp32 and MoE "
                 "models train under autocast, which has no loss scaling); use precision.dtype='bf16'")
    else:
        _require(z.expert_parallel_size == 1,
                 f"deepspeed.expert_parallel_size={z.expert_parallel_size} but the model has no MoE layers; "
                 "set deepspeed.expert_parallel_size=1 or add MoE layers to the model")
    _require(p.dtype != "fp16" or not cfg.model.stages,
             "precision.dtype='fp16' cannot be used with a hierarchical model (model.stages): DeepSpeed's fp16 "
             "mode casts every parameter, and the boundary routers and residual projections must stay float32 "
             "(docs/MODEL.md, 'Precision policy'); use precision.dtype='bf16'")
    _require(c.every_steps >= 0, f"checkpoint.every_steps={c.every_steps} must be >= 0 (0 = only at the end)")
    _require(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be >= 1")
    _require(c.keep_every >= 0, f"checkpoint.keep_every={c.keep_every} must be >= 0")
    _require(lg.every_steps >= 1, f"log.every_steps={lg.every_steps} must be >= 1")
    _require(not lg.wandb or bool(lg.wandb_project),
             "log.wandb_project is empty; name a W&B project or set log.wandb=false")
    _require(sg.spike_zscore >= 0, f"safeguards.spike_zscore={sg.spike_zscore} must be >= 0 (0 disables)")
    _require(sg.spike_ratio >= 1, f"safeguards.spike_ratio={sg.spike_ratio} must be >= 1 (1 = the z-score alone)")
    _require(sg.spike_window >= 2, f"safeguards.spike_window={sg.spike_window} must be >= 2")
    _require(2 <= sg.spike_min_history <= sg.spike_window,
             f"safeguards.spike_min_history={sg.spike_min_history} must be in [2, safeguards.spike_window]")
    _require(sg.max_consecutive_spikes >= 1,
             f"safeguards.max_consecutive_spikes={sg.max_consecutive_spikes} must be >= 1")
    _require(len(sg.compression_band) == 2 and 0 < sg.compression_band[0] <= sg.compression_band[1],
             f"safeguards.compression_band={sg.compression_band} must be [lo, hi] with 0 < lo <= hi")
    _require(cfg.seed >= 0, f"seed={cfg.seed} must be >= 0")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def validate_for_world(cfg: Config, world_size: int, device_type: str) -> None:
    """Checks that need the launch geometry; run on every rank before building anything."""
    b, z = cfg.batch, cfg.deepspeed
    g = cfg.global_batch_sequences()
    per_step = world_size * b.micro_batch_size
    _require(g % per_step == 0,
             f"batch.global_batch_size={g} is not divisible by world size {world_size} x "
             f"batch.micro_batch_size={b.micro_batch_size} = {per_step}; set batch.global_batch_size to a "
             f"multiple of {per_step} (e.g. {max(1, g // per_step) * per_step or per_step})")
    _require(world_size % z.expert_parallel_size == 0,
             f"deepspeed.expert_parallel_size={z.expert_parallel_size} does not divide the world size "
             f"{world_size}; use a divisor of {world_size}")
    # the environment, not the file: a run trained with W&B still loads for evaluation where wandb is missing
    _require(not cfg.log.wandb or _importable("wandb"),
             "log.wandb=true needs the wandb package; install the extra (pip install 'synergy-dist[wandb]') or set "
             "log.wandb=false")
    if device_type == "cpu":
        _require(cfg.precision.dtype != "fp16",
                 "precision.dtype='fp16' is not supported on CPU (DeepSpeed rejects it); use 'fp32' or 'bf16'")
