"""SynergyLM and its configuration."""

from synergy_dist.model.config import (
    PRESETS,
    MambaConfig,
    ModelConfig,
    RouterConfig,
    StackConfig,
    StageConfig,
    base_100m_config,
    byte_transformer_config,
    fixed_hierarchy_config,
    tiny_cpu_config,
    tiny_test_config,
    two_stage_config,
)
from synergy_dist.model.moe import MoEConfig
from synergy_dist.model.synergy import ModelOutput, SynergyLM

__all__ = [
    "PRESETS", "MambaConfig", "ModelConfig", "RouterConfig", "StackConfig", "StageConfig", "MoEConfig",
    "ModelOutput", "SynergyLM", "base_100m_config", "byte_transformer_config", "fixed_hierarchy_config",
    "tiny_cpu_config", "tiny_test_config", "two_stage_config",
]
