"""ModelConfig: validation messages, YAML round trip, the shipped configs, learning-rate multipliers."""

import dataclasses
import math
import subprocess
import sys

import pytest
import yaml
from model_configs import (
    byte_transformer_config,
    fixed_hierarchy_config,
    tiny_test_config,
    two_stage_config,
    yaml_model_config,
)

from synergy_dist.model.accounting import param_counts
from synergy_dist.model.config import ModelConfig, MoEConfig, RouterConfig, StackConfig, StageConfig
from synergy_dist.model.synergy import SynergyLM

CONFIGS = {
    "tiny-test": tiny_test_config,
    "tiny-cpu": lambda: yaml_model_config("tiny-cpu"),
    "base-100m": lambda: yaml_model_config("base-100m"),
    "byte-transformer": byte_transformer_config,
    "fixed-hierarchy": fixed_hierarchy_config,
    "two-stage": two_stage_config,
}


def test_unknown_layer_letter_names_the_key():
    cfg = tiny_test_config()
    cfg.stages[0].encoder.pattern = "MAX"
    expected = r"model\.stages\[0\]\.encoder\.pattern='MAX' has unknown layer letter\(s\) \['X'\]"
    with pytest.raises(ValueError, match=expected):
        SynergyLM(cfg)


def test_unknown_letter_in_middle_fails_at_construction():
    with pytest.raises(ValueError, match=r"model\.middle\.pattern='AT'"):
        ModelConfig(middle=StackConfig(pattern="AT"))


def test_width_mismatch_names_the_key():
    with pytest.raises(ValueError, match=r"model\.d_middle=64 is narrower than model\.stages\[0\]\.d_model=128"):
        ModelConfig(stages=[StageConfig(d_model=128)], d_middle=64)
    # a projection allows any widths
    cfg = ModelConfig(stages=[StageConfig(d_model=128)], d_middle=64, width_change="linear")
    assert cfg.widths() == [128, 64]


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"model\.middle\.n_heads=5 does not divide the width 256"):
        ModelConfig(middle=StackConfig(pattern="A", n_heads=5))


def test_top_k_larger_than_experts_names_the_key():
    middle = StackConfig(pattern="A", repeat=2, moe_every=2, moe=MoEConfig(n_experts=4, top_k=5))
    with pytest.raises(ValueError, match=r"model\.middle\.moe\.top_k=5 is larger than model\.middle\.moe\.n_experts=4"):
        ModelConfig(middle=middle)


@pytest.mark.parametrize("target", [0.5, 0.0, -2.0])
def test_compression_below_one_names_the_key(target):
    with pytest.raises(ValueError, match=r"model\.stages\[0\]\.router\.target_bytes_per_concept=.* must be >= 1"):
        ModelConfig(stages=[StageConfig(router=RouterConfig(target_bytes_per_concept=target))])


def test_learned_router_needs_compression_above_one():
    with pytest.raises(ValueError, match=r"target_bytes_per_concept must be > 1 for a learned router"):
        ModelConfig(stages=[StageConfig(router=RouterConfig(kind="gate", target_bytes_per_concept=1.0))])


def test_other_bad_values():
    with pytest.raises(ValueError, match=r"model\.stages\[0\]\.router\.kind='bpe' is not one of"):
        ModelConfig(stages=[StageConfig(router=RouterConfig(kind="bpe"))])
    with pytest.raises(ValueError, match=r"model\.middle\.pos_encoding='alibi' is not one of \['rope', 'none'\]"):
        ModelConfig(middle=StackConfig(pos_encoding="alibi"))
    with pytest.raises(ValueError, match=r"model\.stages\[1\]\.router\.kind='space' only works on bytes"):
        ModelConfig(stages=[StageConfig(d_model=64), StageConfig(d_model=96, router=RouterConfig(kind="space"))],
                    d_middle=128)
    with pytest.raises(ValueError, match=r"model\.middle\.moe_layers has 7, outside the 4 layers"):
        ModelConfig(middle=StackConfig(pattern="A", repeat=4, moe_layers=[7]))
    with pytest.raises(ValueError, match=r"mamba: inner width expand\*d_model=256 must be a positive multiple"):
        ModelConfig(stages=[StageConfig(d_model=128, encoder=StackConfig(pattern="M", mamba={"head_dim": 48}))])


def test_pattern_parsing_and_moe_layers():
    stack = StackConfig(pattern="MMMA", repeat=2, moe_every=2, moe_layers=[0])
    assert stack.layers == "MMMAMMMA"
    assert stack.moe_layer_indices() == [0, 1, 3, 5, 7]
    cfg = ModelConfig(stages=[StageConfig(d_model=64)], d_middle=64,
                      middle=StackConfig(pattern="MMMA", repeat=2, mamba={"head_dim": 16, "d_state": 8},
                                         moe_every=2, moe=MoEConfig(n_experts=2, top_k=1), mlp_on_mamba=True))
    model = SynergyLM(cfg)
    blocks = model.body.inner.blocks
    assert "".join("A" if type(b.mixer).__name__ == "Attention" else "M" for b in blocks) == "MMMAMMMA"
    assert [i for i, b in enumerate(blocks) if b.is_moe] == [1, 3, 5, 7]


def test_yaml_round_trip_builds_the_same_config():
    cfg = yaml_model_config("base-100m")
    text = yaml.safe_dump(dataclasses.asdict(cfg))
    again = ModelConfig(**yaml.safe_load(text))
    assert again == cfg


def test_unknown_nested_key_is_reported():
    with pytest.raises(ValueError, match=r"unknown StackConfig keys \['layer_pattern'\]"):
        ModelConfig(middle={"layer_pattern": "A"})


def test_configs_build_with_expected_sizes():
    sizes = {name: param_counts(SynergyLM(make()))["total"] for name, make in CONFIGS.items()}
    assert 1_000_000 <= sizes["tiny-cpu"] <= 5_000_000
    assert 80_000_000 <= sizes["base-100m"] <= 130_000_000
    assert sizes["tiny-test"] < 200_000
    assert CONFIGS["byte-transformer"]().stages == []
    assert CONFIGS["fixed-hierarchy"]().stages[0].router.kind == "space"
    assert len(CONFIGS["two-stage"]().stages) == 2


def test_hnet_learning_rate_rule():
    # H-Net 1-stage L: widths 1024, 1536, N = 6 -> [2.63, 0.88];
    # 2-stage L: (3,3), 1024, 1024, 1536 -> [2.63, 1.52, 0.72]
    one = ModelConfig(stages=[StageConfig(d_model=1024, router=RouterConfig(target_bytes_per_concept=6.0))],
                      d_middle=1536, middle=StackConfig(n_heads=8))
    assert [round(x, 2) for x in one.lr_multipliers()] == [2.63, 0.88]
    two = ModelConfig(
        stages=[StageConfig(d_model=1024, router=RouterConfig(target_bytes_per_concept=3.0)),
                StageConfig(d_model=1024, router=RouterConfig(target_bytes_per_concept=3.0))],
        d_middle=1536, middle=StackConfig(n_heads=8))
    assert [round(x, 2) for x in two.lr_multipliers()][:2] == [2.63, 1.52]
    assert math.isclose(two.lr_multipliers()[2], 0.72, abs_tol=0.01)
    two.stages[0].lr_mult = 2.0
    two.middle_lr_mult = 1.0
    assert two.lr_multipliers()[0] == 2.0 and two.lr_multipliers()[2] == 1.0
    assert math.isclose(two.lr_multipliers()[1], 1.52, abs_tol=0.01)


def test_model_config_imports_neither_torch_distributed_nor_deepspeed():
    code = ("import sys, synergy_dist.model.config; "
            "print(sorted(m for m in ('deepspeed', 'torch.distributed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
