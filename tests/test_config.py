"""The typed training config: YAML, dotted overrides, derived values, every validation message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from synergy_dist.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    save_config,
    validate_for_world,
)
from synergy_dist.train.ds_config import build_ds_config, deep_merge

REPO = Path(__file__).resolve().parents[1]
MOE_MIDDLE = ["model.middle.moe_every=1", "model.middle.moe.n_experts=4"]


def test_defaults_build_and_overrides_change_only_named_keys():
    cfg = load_config(None, ["train.lr=3e-4", "model.middle.repeat=12", "data.sources=[a, b]", "log.every_steps=5"])
    default = Config()
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.middle.repeat == 12
    # A partial override of a nested section keeps that section's preset values.
    assert cfg.model.middle.pattern == default.model.middle.pattern
    assert cfg.model.middle.pos_encoding == default.model.middle.pos_encoding == "none"
    assert cfg.data.sources == ["a", "b"]
    assert cfg.log.every_steps == 5
    assert cfg.checkpoint.every_steps == default.checkpoint.every_steps


def test_overrides_reach_list_items_and_a_named_list_is_replaced_whole():
    tiny = load_config(REPO / "configs" / "tiny-cpu.yaml", ["model.stages.0.router.kind=gate"])
    stage = tiny.model.stages[0]
    assert stage.router.kind == "gate"
    # The item keeps the file's other values; only the named key changed.
    assert (stage.d_model, stage.router.target_bytes_per_concept, stage.encoder.mamba.d_state) == (128, 4.0, 32)
    # A list the file does not set is taken from the defaults before its item changes.
    default = load_config(None, ["model.stages.0.router.kind=gate"])
    assert default.model.stages[0].router.kind == "gate"
    assert default.model.stages[0].d_model == Config().model.stages[0].d_model
    assert load_config(None, ["data.sources=[a, b]", "data.sources.1=c"]).data.sources == ["a", "c"]
    assert load_config(None, ["data.sources=[a, b]", "data.sources=[d]"]).data.sources == ["d"]


LIST_OVERRIDE_ERRORS = [
    (["model.stages.3.router.kind=gate"],
     "override 'model.stages.3.router.kind=gate': model.stages has 1 item(s) (indices 0..0)"),
    (["data.sources.0=x"], "override 'data.sources.0=x': data.sources has 0 item(s) (replace the whole list: "
                           "data.sources=[...])"),
    (["model.stages.router.kind=gate"], "override 'model.stages.router.kind=gate': model.stages is a list; "
                                        "'router' is not an item index (write model.stages.0 for its first item)"),
    (["model.stages.-1.router.kind=gate"], "override 'model.stages.-1.router.kind=gate': model.stages is a list; "
                                           "'-1' is not an item index (write model.stages.0 for its first item)"),
    (["data.seq_len.0=5"], "override 'data.seq_len.0=5': data.seq_len is a value, not a list; it has no item 0"),
    (["train.lr.x=1"], "override 'train.lr.x': 'lr' is a value, not a section"),
]


@pytest.mark.parametrize("overrides,message", LIST_OVERRIDE_ERRORS, ids=[" ".join(o) for o, _ in LIST_OVERRIDE_ERRORS])
@pytest.mark.parametrize("path", [None, REPO / "configs" / "tiny-cpu.yaml"], ids=["defaults", "tiny-cpu"])
def test_list_item_override_errors_name_the_list(path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(err.value) == message


def test_yaml_file_then_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run": {"dir": "runs/x"}, "train": {"max_steps": 7, "lr": 1e-3},
                                    "checkpoint": {"every_steps": 3}}))
    cfg = load_config(path, ["train.max_steps=9"])
    assert (cfg.run.dir, cfg.train.max_steps, cfg.train.lr, cfg.checkpoint.every_steps) == ("runs/x", 9, 1e-3, 3)
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.max_steps >= 1


def test_derived_batch_values():
    cfg = load_config(None, ["batch.global_batch_size=0", "batch.global_batch_bytes=8192", "data.seq_len=512",
                             "batch.micro_batch_size=2"])
    assert cfg.global_batch_sequences() == 16
    assert cfg.grad_accumulation_steps(world_size=2) == 4


# Every validation message: (overrides, exact message).
ERRORS = [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; known keys here: betas, eps, grad_clip, weight_decay"),
    (["nonsense=1"], "unknown config key 'nonsense'; known keys here: batch, checkpoint, data, debug, deepspeed, "
                     "distributed, log, model, optim, precision, run, safeguards, schedule, seed, train"),
    (["train.lr=abc"], "config key 'train.lr' must be a number, got 'abc'"),
    (["train.max_steps=1.5"], "config key 'train.max_steps' must be an integer, got 1.5"),
    (["log.tensorboard=maybe"], "config key 'log.tensorboard' must be true or false, got 'maybe'"),
    (["train=3"], "config key 'train' must be a mapping of its sub-keys, got 3"),
    (["data.sources=x"], "config key 'data.sources' must be a list, got 'x'"),
    (["run.dir="], "run.dir is empty; set it to the run directory, e.g. run.dir=runs/my-run"),
    (["data.seq_len=4"], "data.seq_len=4 is too small; use at least 8 (e.g. data.seq_len=512)"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["data.on_corrupt=ignore"], "data.on_corrupt='ignore' must be 'error' or 'skip'"),
    (["data.sample_valid_fraction=0"], "data.sample_valid_fraction=0.0 must be between 0 and 1 (e.g. 0.05)"),
    (["data.sources=[a]", "data.weights=[1, 2]"],
     "data.weights has 2 entries but data.sources has 1; give one weight per source or leave data.weights empty"),
    (["data.sources=[a, b]", "data.weights=[1, -2]"], "data.weights=[1, -2] must all be positive numbers"),
    (["batch.micro_batch_size=0"], "batch.micro_batch_size=0 must be >= 1"),
    (["batch.global_batch_bytes=4096"],
     "set exactly one of batch.global_batch_size (sequences) and batch.global_batch_bytes (bytes); "
     "set the other to 0"),
    (["batch.global_batch_size=0", "batch.global_batch_bytes=1000", "data.seq_len=512"],
     "batch.global_batch_bytes=1000 is not a multiple of data.seq_len=512; use a multiple such as 512"),
    (["train.lr=0"], "train.lr=0.0 must be a positive number (e.g. train.lr=3e-4)"),
    (["train.max_steps=0"], "train.max_steps=0 must be >= 1"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers in [0, 1), e.g. [0.9, 0.95]"),
    (["optim.eps=0"], "optim.eps=0.0 must be > 0"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1.0 must be >= 0 (0 disables clipping)"),
    (["schedule.kind=linear"], "schedule.kind='linear' is unknown; use 'cosine', 'wsd' or 'constant'"),
    (["schedule.min_lr_ratio=2"], "schedule.min_lr_ratio=2.0 must be in [0, 1]"),
    (["precision.dtype=fp8"], "precision.dtype='fp8' is unknown; use 'auto', 'fp32', 'bf16' or 'fp16'"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4 must be 0, 1, 2 or 3"),
    (["deepspeed.offload_optimizer=true"],
     "deepspeed.offload_optimizer needs ZeRO; set deepspeed.zero_stage to 1, 2 or 3"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_param=true"],
     "deepspeed.offload_param needs ZeRO-3; set deepspeed.zero_stage=3 or deepspeed.offload_param=false"),
    (["deepspeed.extra_json=/nonexistent/ds.json"],
     "deepspeed.extra_json='/nonexistent/ds.json' does not exist; give the path of a DeepSpeed JSON file"),
    (["deepspeed.zero_stage=3", *MOE_MIDDLE],
     "deepspeed.zero_stage=3 cannot be used with MoE layers (DeepSpeed refuses native MoE under ZeRO-3); "
     "use deepspeed.zero_stage=2 or a model without MoE layers"),
    (["precision.dtype=fp16", *MOE_MIDDLE],
     "precision.dtype='fp16' cannot be used with MoE layers (their routers must stay fp32 and MoE models train "
     "under autocast, which has no loss scaling); use precision.dtype='bf16'"),
    (["precision.dtype=fp16"],
     "precision.dtype='fp16' cannot be used with a hierarchical model (model.stages): DeepSpeed's fp16 mode casts "
     "every parameter, and the boundary routers and residual projections must stay float32 (docs/MODEL.md, "
     "'Precision policy'); use precision.dtype='bf16'"),
    (["deepspeed.expert_parallel_size=2"],
     "deepspeed.expert_parallel_size=2 but the model has no MoE layers; set deepspeed.expert_parallel_size=1 "
     "or add MoE layers to the model"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last=0 must be >= 1"),
    (["checkpoint.every_steps=-1"], "checkpoint.every_steps=-1 must be >= 0 (0 = only at the end)"),
    (["log.every_steps=0"], "log.every_steps=0 must be >= 1"),
    (["safeguards.spike_window=1"], "safeguards.spike_window=1 must be >= 2"),
    (["safeguards.spike_min_history=500"], "safeguards.spike_min_history=500 must be in [2, safeguards.spike_window]"),
    (["safeguards.compression_band=[2, 1]"],
     "safeguards.compression_band=[2, 1] must be [lo, hi] with 0 < lo <= hi"),
    (["seed=-1"], "seed=-1 must be >= 0"),
    (["model.middle.pattern=AX"],
     "invalid config under 'model': model.middle.pattern='AX' has unknown layer letter(s) ['X']; use 'A' "
     "(causal self-attention), 'M' (Mamba-2 style selective SSM)"),
    (["model.middle.patern=A"], None),  # unknown nested key: message starts as below
    (["train.lr"], "override 'train.lr' must look like key.sub_key=value (e.g. train.lr=3e-4)"),
    (["train..lr=1"], "override 'train..lr=1' has an empty key; write it as key.sub_key=value"),
]


@pytest.mark.parametrize("overrides,message", ERRORS, ids=[" ".join(o) for o, _ in ERRORS])
def test_every_config_error_names_key_and_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    if message is None:
        assert str(err.value).startswith("unknown config key 'model.middle.patern'; known keys here: ")
    else:
        assert str(err.value) == message


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file '.*missing.yaml' does not exist; pass an existing YAML"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections \(run:, model:, train:, \.\.\.\)$"):
        load_config(bad)
    broken = tmp_path / "ds.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"^deepspeed.extra_json='.*ds.json' is not valid JSON: "):
        load_config(None, [f"deepspeed.extra_json={broken}"])


def test_deepspeed_extras_cannot_contradict_the_config(tmp_path):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"deepspeed.extra_json={zero3}"])
    assert str(err.value) == (f"deepspeed.extra_json='{zero3}' sets zero_optimization.stage=3 but "
                              "deepspeed.zero_stage=0; set deepspeed.zero_stage=3 (the trainer's checks use it)")
    load_config(None, [f"deepspeed.extra_json={zero3}", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["deepspeed.extra={train_batch_size: 64}"])
    assert str(err.value) == ("deepspeed.extra sets 'train_batch_size', which the trainer derives; "
                              "set batch.global_batch_size instead")


def test_world_size_errors():
    cfg = load_config(None, ["batch.global_batch_size=6", "batch.micro_batch_size=2"])
    with pytest.raises(ConfigError) as err:
        validate_for_world(cfg, world_size=2, device_type="cpu")
    assert str(err.value) == ("batch.global_batch_size=6 is not divisible by world size 2 x batch.micro_batch_size=2 "
                              "= 4; set batch.global_batch_size to a multiple of 4 (e.g. 4)")
    validate_for_world(cfg, world_size=1, device_type="cpu")  # 6 = 3 x (1 x 2): fine
    moe = load_config(None, ["deepspeed.expert_parallel_size=2", "batch.global_batch_size=6", *MOE_MIDDLE])
    with pytest.raises(ConfigError) as err:
        validate_for_world(moe, world_size=3, device_type="cpu")
    assert str(err.value) == "deepspeed.expert_parallel_size=2 does not divide the world size 3; use a divisor of 3"
    fp16 = load_config(None, ["precision.dtype=fp16", "model.stages=[]"])  # a plain byte model may use fp16
    with pytest.raises(ConfigError) as err:
        validate_for_world(fp16, world_size=1, device_type="cpu")
    assert str(err.value) == ("precision.dtype='fp16' is not supported on CPU (DeepSpeed rejects it); "
                              "use 'fp32' or 'bf16'")


def test_cli_reports_config_error_before_any_compute(capsys):
    from synergy_dist.cli.train import main

    assert main(["train.lr=-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "synergy-train: configuration error: train.lr=-1.0 must be a positive number (e.g. train.lr=3e-4)")


def test_loading_a_config_imports_neither_deepspeed_nor_torch_distributed():
    """A bad config is reported without paying for the heavy imports (DeepSpeed alone takes ~1.2 s)."""
    probe = ("import sys\n"
             "import synergy_dist.config as c\n"
             "try:\n"
             "    c.load_config('configs/tiny-cpu.yaml', ['train.lr=oops'])\n"
             "except c.ConfigError:\n"
             "    pass\n"
             "print(sorted(m for m in ('deepspeed', 'torch.distributed') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_deepspeed_json_is_generated_and_extra_json_merged(tmp_path):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5}))
    cfg = config_from_dict({
        "batch": {"global_batch_size": 16, "micro_batch_size": 2},
        "deepspeed": {"zero_stage": 2, "extra_json": str(extra), "extra": {"wall_clock_breakdown": True}},
    })
    ds = build_ds_config(cfg, world_size=2, dtype=torch.bfloat16)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["gradient_clipping"] == 0.5  # the extra JSON wins
    assert ds["wall_clock_breakdown"] is True  # deepspeed.extra wins over both
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds  # precision policy
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


def test_the_earlier_name_of_on_corrupt_error_still_loads():
    assert load_config(None, ["data.on_corrupt=raise"]).data.on_corrupt == "error"
