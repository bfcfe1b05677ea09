"""Model configurations for tests: tiny unit-test models built from the dataclasses, and the shipped YAML configs."""

from __future__ import annotations

from pathlib import Path

from synergy_dist.config import load_config
from synergy_dist.model.config import MambaConfig, ModelConfig, RouterConfig, StackConfig, StageConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def yaml_model_config(name: str) -> ModelConfig:
    """The model section of configs/<name>.yaml (e.g. "tiny-cpu", "base-100m")."""
    return load_config(CONFIGS / f"{name}.yaml").model


def tiny_test_config(router: str = "cosine", layers: str = "MA", middle: str = "AM") -> ModelConfig:
    """A few-thousand-parameter model for unit tests (any router / layer letters)."""
    mamba = MambaConfig(d_state=8, head_dim=8, chunk_size=8)
    stack = dict(n_heads=2, mlp_ratio=2.0, mamba=mamba)
    return ModelConfig(
        stages=[StageConfig(
            d_model=32,
            encoder=StackConfig(pattern=layers, **stack),
            decoder=StackConfig(pattern=layers, **stack),
            router=RouterConfig(kind=router, target_bytes_per_concept=3.0, stride=3),
        )],
        d_middle=48,
        middle=StackConfig(pattern=middle, pos_encoding="none", n_heads=2, mlp_ratio=2.0, mamba=mamba),
    )


def byte_transformer_config(d_model: int = 256, depth: int = 6, n_heads: int = 4) -> ModelConfig:
    """The plain byte-level Transformer baseline: no router, the 'middle' runs on bytes with RoPE."""
    return ModelConfig(
        stages=[], d_middle=d_model,
        middle=StackConfig(pattern="A", repeat=depth, n_heads=n_heads, pos_encoding="rope"),
    )


def fixed_hierarchy_config(kind: str = "space", stride: int = 4) -> ModelConfig:
    """The tiny-cpu hierarchy with a fixed router ('stride' every k bytes or 'space' after whitespace)."""
    cfg = yaml_model_config("tiny-cpu")
    cfg.stages[0].router = RouterConfig(kind=kind, stride=stride, target_bytes_per_concept=float(stride))
    cfg.validate()
    return cfg


def two_stage_config() -> ModelConfig:
    """A tiny (3,3)-DC two-stage hierarchy: bytes -> concepts -> super-concepts -> middle."""
    mamba = MambaConfig(d_state=16, head_dim=16, chunk_size=32)
    return ModelConfig(
        stages=[
            StageConfig(d_model=64, encoder=StackConfig(pattern="MM", mamba=mamba),
                        decoder=StackConfig(pattern="MM", mamba=mamba),
                        router=RouterConfig(target_bytes_per_concept=3.0)),
            StageConfig(d_model=96, encoder=StackConfig(pattern="AM", n_heads=4, mamba=mamba),
                        decoder=StackConfig(pattern="MA", n_heads=4, mamba=mamba),
                        router=RouterConfig(target_bytes_per_concept=3.0)),
        ],
        d_middle=128,
        middle=StackConfig(pattern="A", repeat=2, n_heads=4, pos_encoding="none"),
    )
