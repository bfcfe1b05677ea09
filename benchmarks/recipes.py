"""SynergyLM recipes of the scaling study (issue 14, section 2): row 1's model with named changes.

A recipe is a study row: `python -m benchmarks.scaling run --row <recipe>` trains row 1
(configs/tiny-cpu.yaml's model) with the recipe's `model.*` overrides (the syntax of `synergy-train`'s
command line) at the recipe's learning-rate multiple. docs/BENCHMARKS.md ("Recipe search") has the ones
that ran and what they gave. Changes of the target compression N move compute
into the middle so that training FLOPs per byte stay within a few percent of row 1's (the issue's rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

N = "model.stages.0.router.target_bytes_per_concept"
ENCODER, DECODER = "model.stages.0.encoder.pattern", "model.stages.0.decoder.pattern"
ATTENTION_BYTE_LEVEL = [f"{ENCODER}=A", f"{DECODER}=A"]
FLAT_LR_MULT = ["model.stages.0.lr_mult=1", "model.middle_lr_mult=1"]
RATIO = "model.stages.0.router.ratio_loss_coef"


@dataclass(frozen=True)
class Recipe:
    what: str  # one line for the tables
    overrides: list[str] = field(default_factory=list)  # model.* overrides applied to row 1's model
    lr_mult: float = 1.0  # the peak learning rate is the study's base lr times this


RECIPES: dict[str, Recipe] = {
    # the target compression N, with the middle grown to hold FLOPs per byte
    "recipe-n6-wide": Recipe("N=6, middle 320 wide", [f"{N}=6", "model.d_middle=320", "model.middle.n_heads=5"]),
    "recipe-n6-deep": Recipe("N=6, middle 5 layers deep", [f"{N}=6", "model.middle.repeat=5"]),
    "recipe-n8-deep": Recipe("N=8, middle 6 layers deep", [f"{N}=8", "model.middle.repeat=6"]),
    "recipe-n8-wide": Recipe("N=8, middle 4 layers x 320", [f"{N}=8", "model.middle.repeat=4", "model.d_middle=320",
                                                             "model.middle.n_heads=5"]),
    # the byte-level encoder/decoder
    "recipe-hybrid-encdec": Recipe("encoder Mamba+attention, decoder attention+Mamba", [f"{ENCODER}=MA",
                                                                                        f"{DECODER}=AM"]),
    "recipe-attention-encdec": Recipe("one attention layer (with its MLP) each side instead of two Mamba: 0.97x "
                                      "the FLOPs per byte, matrix products the CPU runs faster than the scan",
                                      ATTENTION_BYTE_LEVEL),
    "recipe-attention-encdec-warmup": Recipe("the attention byte level with the router warm-up (its router alone "
                                             "collapsed to one concept per window)",
                                             [*ATTENTION_BYTE_LEVEL, "model.stages.0.router.warmup_steps=50"]),
    "recipe-one-mamba": Recipe("one Mamba layer each side, 4 middle layers", [f"{ENCODER}=M", f"{DECODER}=M",
                                                                               "model.middle.repeat=4"]),
    # the learning rate: global, and the parts' multipliers (row 1: H-Net Eq. 11, about 3.0 bytes, 1.07 middle)
    "recipe-lr-half": Recipe("peak lr x 0.5", lr_mult=0.5),
    "recipe-lr-double": Recipe("peak lr x 2", lr_mult=2.0),
    "recipe-flat-lr-mult": Recipe("no per-part lr multipliers (all 1)", FLAT_LR_MULT),
    # the router's training
    "recipe-ratio-0.01": Recipe("ratio-loss weight 0.01 (row 1: 0.03)", [f"{RATIO}=0.01"]),
    "recipe-ratio-0.1": Recipe("ratio-loss weight 0.1 (row 1: 0.03)", [f"{RATIO}=0.1"]),
    # the best recipe measured: configs/tiny-cpu.yaml's model since 2026-12-05 (before it, recipe-flat-lr-mult)
    "recipe-flat-ratio-0.1": Recipe("flat per-part lr multipliers and ratio-loss weight 0.1 (the two gains at 12 "
                                    "minutes together)", [*FLAT_LR_MULT, f"{RATIO}=0.1"]),
    "recipe-no-ema": Recipe("no EMA smoothing of the concepts", ["model.stages.0.router.smoothing=false"]),
    "recipe-router-warmup": Recipe("router warm-up: a stride-4 router hands over to the learned one over 50 steps",
                                   ["model.stages.0.router.warmup_steps=50"]),
}
