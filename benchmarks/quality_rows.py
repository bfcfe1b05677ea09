"""The rows of the quality comparison (`python -m benchmarks.quality`), as ModelConfigs.

Rows 1-5 share one hierarchy (the `model:` section of configs/tiny-cpu.yaml: Mamba byte
encoder/decoder at 128, a 3-layer attention middle at 256, target N = 4; with H-Net Eq. 11's learning-rate
multipliers, as measured before the config adopted flat ones) and differ only in the part
the row is about (row 4b, Mixture-of-Depths, adds a middle layer to stay at row 1's FLOPs). Row 6 (plain
byte Transformer) and row 7 (the Llama/BPE anchor, benchmarks/anchors/llama_bpe.py) are
sized so that their training FLOPs per byte equal row 1's at its target compression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from synergy_dist.bench.model import (
    byte_transformer,
    load_model_config,
    with_fixed_router,
)
from synergy_dist.config import ConfigError, config_from_dict, to_plain
from synergy_dist.model.accounting import flops_per_byte
from synergy_dist.model.config import ModConfig, ModelConfig, MoEConfig, RouterConfig, mlp_hidden

ROW1_CONFIG = "configs/tiny-cpu.yaml"  # row 1's model; rows 2-6 are built from it
# row 1 as the quality table and the scaling study measured it: H-Net Eq. 11's per-part learning-rate multipliers
# and H-Net's ratio-loss weight 0.03. The config has since adopted the recipe search's best, flat multipliers and
# weight 0.1 (`recipe-flat-ratio-0.1` is the config's model).
ROW1_AS_MEASURED = ["model.stages.0.lr_mult=0", "model.middle_lr_mult=0", "model.stages.0.router.ratio_loss_coef=0.03"]

LLAMA_ROW = "llama-bpe"  # row 7: not a ModelConfig, built by the anchor module
MOE_EXPERTS = 4  # routed experts per middle MoE layer (row 4)
MOE_TOP_K = 2  # each expert is half the dense MLP, so top-2 computes what the dense MLP computes
MOD_CAPACITY = 0.5  # the MoD row: every second middle layer processes half the concepts of each window


@dataclass
class QualityRow:
    name: str = ""  # short identifier used on the command line and in the table
    number: str = ""  # the row number of issue 6 ("1" .. "7", "5a"/"5b")
    what: str = ""  # one line for the table


def default_config() -> ModelConfig:
    """Row 1: the default SynergyLM (learned cosine router, NoPE middle) of configs/tiny-cpu.yaml, with the
    learning-rate multipliers it was measured with (ROW1_AS_MEASURED)."""
    return with_overrides(load_model_config(ROW1_CONFIG), ROW1_AS_MEASURED)


def unisolated_config() -> ModelConfig:
    """Row 1 without document isolation: packed documents see the ones before them (the cost of isolation)."""
    cfg = default_config()
    cfg.document_isolation = False
    cfg.validate()
    return cfg


def gate_router_config() -> ModelConfig:
    """Row 2: the same model with the sigmoid `gate` router."""
    cfg = default_config()
    cfg.stages[0].router = RouterConfig(kind="gate", target_bytes_per_concept=4.0)
    cfg.validate()
    return cfg


def rope_middle_config() -> ModelConfig:
    """Row 3: RoPE in the middle (the positional-encoding ablation)."""
    cfg = default_config()
    cfg.middle.pos_encoding = "rope"
    cfg.validate()
    return cfg


def moe_middle_config() -> ModelConfig:
    """Row 4: every middle layer's SwiGLU MLP becomes MoE (4 experts of half width, top-2).

    Active parameters per concept equal row 1's plus the expert routers (d_middle x n_experts per
    layer): top-2 of half-width experts is the dense MLP's hidden width.
    """
    cfg = default_config()
    dense_hidden = mlp_hidden(cfg.d_middle, cfg.middle.mlp_ratio)
    if dense_hidden % MOE_TOP_K:
        raise ValueError(f"dense MLP width {dense_hidden} is not divisible by top_k={MOE_TOP_K}")
    cfg.middle.moe_every = 1
    cfg.middle.moe = MoEConfig(n_experts=MOE_EXPERTS, top_k=MOE_TOP_K, d_ff=dense_hidden // MOE_TOP_K)
    cfg.validate()
    return cfg


def mod_middle_config() -> ModelConfig:
    """Row 4b: Mixture-of-Depths in the middle at row 1's FLOPs: one middle layer more (4 instead of 3), every
    second one routed at capacity 0.5 (MoD's alternating routed and full blocks). The two routed layers cost one
    full layer, so training FLOPs per byte are row 1's + 0.3% (the routers and predictors): the comparison is
    the MoD paper's isoFLOP one (more depth at the same compute), not the same model made cheaper."""
    cfg = default_config()
    cfg.middle.repeat = len(cfg.middle.layers) + 1
    cfg.middle.mod = ModConfig(capacity=MOD_CAPACITY, every=2)
    cfg.validate()
    return cfg


def with_overrides(cfg: ModelConfig, overrides: list[str]) -> ModelConfig:
    """`cfg` with `model.*` overrides (synergy-train's command-line syntax) applied and validated."""
    if not overrides:
        return cfg
    foreign = [o for o in overrides if not o.startswith("model.")]
    if foreign:
        raise ValueError(f"model overrides {foreign} must start with 'model.' (e.g. model.d_middle=320)")
    try:
        return config_from_dict({"model": to_plain(cfg)}, list(overrides)).model
    except ConfigError as err:
        raise ValueError(f"model overrides {list(overrides)}: {err}") from err


def stride_config() -> ModelConfig:
    """Row 5a: fixed hierarchy, a concept every 4 bytes."""
    return with_fixed_router(default_config(), "stride", 4)


def space_config() -> ModelConfig:
    """Row 5b: fixed hierarchy, a concept per word (boundary after whitespace/punctuation)."""
    return with_fixed_router(default_config(), "space", 4)


def matched_byte_transformer(target_flops_per_byte: float, seq_len: int) -> ModelConfig:
    """Row 6: the plain byte Transformer whose training FLOPs/byte are closest to the target.

    Width multiples of 32 (head dim 32), depth 1-12; ties are broken towards the deeper model.
    """
    base = default_config()
    best: tuple[float, int, ModelConfig] | None = None
    for d_model in range(64, 513, 32):
        for depth in range(1, 13):
            cfg = byte_transformer(base, d_model=d_model, depth=depth, n_heads=d_model // 32)
            gap = abs(flops_per_byte(cfg, seq_len) / target_flops_per_byte - 1)
            if best is None or (gap, -depth) < (best[0], -best[1]):
                best = (gap, depth, cfg)
    assert best is not None
    return best[2]


SYNERGY_ROWS: dict[str, tuple[QualityRow, Callable[[], ModelConfig]]] = {
    "synergy-cosine": (QualityRow("synergy-cosine", "1", "SynergyLM, learned cosine router, NoPE middle (default)"),
                       default_config),
    "synergy-cosine-unisolated": (QualityRow("synergy-cosine-unisolated", "1b",
                                             "row 1 without document isolation (model.document_isolation=false)"),
                                  unisolated_config),
    "synergy-gate": (QualityRow("synergy-gate", "2", "SynergyLM, gate router"), gate_router_config),
    "synergy-rope-middle": (QualityRow("synergy-rope-middle", "3", "SynergyLM, RoPE in the middle"),
                            rope_middle_config),
    "synergy-moe-middle": (QualityRow("synergy-moe-middle", "4",
                                      f"SynergyLM, MoE middle ({MOE_EXPERTS} experts, top-{MOE_TOP_K}, "
                                      "same active params as row 1)"), moe_middle_config),
    "synergy-mod-middle": (QualityRow("synergy-mod-middle", "4b",
                                      f"SynergyLM, Mixture-of-Depths middle (4 layers, every 2nd routed at capacity "
                                      f"{MOD_CAPACITY}, row 1's FLOPs)"), mod_middle_config),
    "synergy-stride4": (QualityRow("synergy-stride4", "5a", "fixed hierarchy, stride 4"), stride_config),
    "synergy-space": (QualityRow("synergy-space", "5b", "fixed hierarchy, whitespace router"), space_config),
}
BYTE_TRANSFORMER_ROW = QualityRow("byte-transformer", "6", "plain byte-level Transformer (RoPE), FLOPs-matched")
LLAMA_BPE_ROW = QualityRow(LLAMA_ROW, "7", "Llama (HF transformers) over byte-level BPE, FLOPs-matched")
ROW_NAMES = [*SYNERGY_ROWS, BYTE_TRANSFORMER_ROW.name, LLAMA_BPE_ROW.name]
REFERENCE_ROW = "synergy-cosine"  # the row every other row's compute is matched to


def row_info(name: str) -> QualityRow:
    if name in SYNERGY_ROWS:
        return SYNERGY_ROWS[name][0]
    for row in (BYTE_TRANSFORMER_ROW, LLAMA_BPE_ROW):
        if row.name == name:
            return row
    raise ValueError(f"unknown quality row {name!r}; choose from {ROW_NAMES}")


def reference_flops_per_byte(seq_len: int) -> float:
    """Training FLOPs per byte of row 1 at its target compression: the budget every row is sized to."""
    return flops_per_byte(default_config(), seq_len)


def model_config(name: str, seq_len: int) -> ModelConfig:
    """The ModelConfig of a byte-level row (rows 1-6)."""
    if name in SYNERGY_ROWS:
        return SYNERGY_ROWS[name][1]()
    if name == BYTE_TRANSFORMER_ROW.name:
        return matched_byte_transformer(reference_flops_per_byte(seq_len), seq_len)
    if name == LLAMA_ROW:
        raise ValueError(f"row {LLAMA_ROW!r} is not a SynergyLM: it is built by benchmarks.anchors.llama_bpe")
    raise ValueError(f"unknown quality row {name!r}; choose from {ROW_NAMES}")
