"""The typed statistics SynergyLM.forward returns: losses, compression per hierarchy stage, MoE load per layer,
Mixture-of-Depths routing per routed layer.

All tensors are detached. `flatten()` gives the metric keys of metrics.jsonl (`bpb`, `stage0/compression`,
`moe/<layer>/tokens_per_expert`, `mod/<layer>/processed_fraction`, ...); `ModelStatistics.mean` averages the
statistics of several forward calls (the micro-batches of one optimizer step), except bits per byte, which it
weights by bytes.

Bits per byte has one definition (docs/EVALUATION.md): the summed cross entropy of the byte targets (labels
0..255) in bits / their number. Predictions of EOD are trained on (they are part of `ce_loss`) but not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from synergy_dist.model.mod import ModStats
from synergy_dist.model.moe.statistics import MoEStats

MOE_LOGGED = ("tokens_per_expert", "load_entropy", "max_over_mean_load", "dropped_fraction", "router_logit_rms",
              "aux_loss", "z_loss")  # the MoE statistics written to the metrics
MOD_LOGGED = ("processed_fraction", "predictor_accuracy", "predictor_loss")  # the MoD statistics written there


@dataclass
class StageStatistics:
    """One hierarchy stage, one forward call (float32 scalars)."""

    units: torch.Tensor  # valid inputs of this stage (bytes at stage 0, concepts of stage s-1 further in)
    concepts: torch.Tensor  # concepts it opened
    boundary_rate: torch.Tensor  # concepts / units
    compression: torch.Tensor  # inputs of this stage per concept
    bytes_per_concept: torch.Tensor  # bytes per concept of this stage (cumulative over the stages outside it)
    ratio_loss: torch.Tensor  # H-Net ratio loss of its router, unweighted


@dataclass
class ModelStatistics:
    """One forward call of SynergyLM (or the mean of several, see `mean`)."""

    stages: list[StageStatistics]  # outermost first; [] for a plain byte model
    moe: dict[str, MoEStats]  # per MoE layer, keyed by its place: "middle.3", "stage0.encoder.1", ...
    ce_loss: torch.Tensor | None = None  # the trained cross entropy: nats per counted label, EOD included
    byte_nats: torch.Tensor | None = None  # summed cross entropy of the byte targets (labels 0..255), nats
    n_bytes: torch.Tensor | None = None  # number of byte targets
    mod: dict[str, ModStats] = field(default_factory=dict)  # per Mixture-of-Depths routed layer, keyed like moe

    @property
    def bpb(self) -> torch.Tensor | None:
        """Bits per byte: byte_nats / n_bytes / ln 2 (0 with no byte target; None without labels)."""
        if self.byte_nats is None:
            return None
        return bits_per_byte(self.byte_nats, self.n_bytes)

    @property
    def ratio_loss(self) -> torch.Tensor:
        """Sum of the stages' unweighted ratio losses (0 without stages)."""
        return sum((s.ratio_loss for s in self.stages), torch.zeros((), dtype=torch.float32))

    @property
    def bytes_per_concept(self) -> torch.Tensor:
        """Bytes per concept of the outermost stage (1 for a plain byte model)."""
        return self.stages[0].bytes_per_concept if self.stages else torch.ones((), dtype=torch.float32)

    @property
    def boundary_rate(self) -> torch.Tensor:
        """Boundary rate of the outermost stage (1 for a plain byte model)."""
        return self.stages[0].boundary_rate if self.stages else torch.ones((), dtype=torch.float32)

    def flatten(self) -> dict[str, float | list[float]]:
        """The metrics.jsonl keys: ce_loss and bpb (with labels), ratio_loss, bytes_per_concept, boundary_rate,
        stage{s}/{boundary_rate,compression,bytes_per_concept,ratio_loss}, moe/<layer>/<statistic>,
        mod/<layer>/<statistic>."""
        out: dict[str, torch.Tensor] = {}
        if self.ce_loss is not None:
            out["ce_loss"], out["bpb"] = self.ce_loss, self.bpb
        for s, stage in enumerate(self.stages):
            for key in ("boundary_rate", "compression", "bytes_per_concept", "ratio_loss"):
                out[f"stage{s}/{key}"] = getattr(stage, key)
        out["ratio_loss"] = self.ratio_loss
        out["bytes_per_concept"] = self.bytes_per_concept
        out["boundary_rate"] = self.boundary_rate
        for name, layer in self.moe.items():
            for key in MOE_LOGGED:
                out[f"moe/{name}/{key}"] = getattr(layer, key)
        for name, layer in self.mod.items():
            for key in MOD_LOGGED:
                out[f"mod/{name}/{key}"] = getattr(layer, key)
        return {key: _number(value) for key, value in out.items()}

    @staticmethod
    def mean(calls: list[ModelStatistics]) -> ModelStatistics:
        """Field-wise mean of the statistics of several forward calls of the same model (on the first's device)."""
        if not calls:
            raise ValueError("ModelStatistics.mean needs at least one forward call's statistics")
        first = calls[0]
        stages = [StageStatistics(**{f.name: _mean([c.stages[s] for c in calls], f.name)
                                     for f in fields(StageStatistics)})
                  for s in range(len(first.stages))]
        moe = {name: MoEStats(**{f.name: _mean([c.moe[name] for c in calls], f.name) for f in fields(MoEStats)})
               for name in first.moe}
        mod = {name: ModStats(**{f.name: _mean([c.mod[name] for c in calls], f.name) for f in fields(ModStats)})
               for name in first.mod}
        if not all(c.ce_loss is not None for c in calls):
            return ModelStatistics(stages, moe, mod=mod)
        return ModelStatistics(stages, moe, _mean(calls, "ce_loss"), _sum(calls, "byte_nats"), _sum(calls, "n_bytes"),
                               mod)


def bits_per_byte(nats, n_bytes):
    """The one definition: summed nats of the byte targets / their number / ln 2 (0 for no bytes). Works on
    floats and on tensors alike."""
    if isinstance(n_bytes, torch.Tensor):
        return nats.double() / n_bytes.double().clamp(min=1) / math.log(2)
    return nats / max(n_bytes, 1) / math.log(2)


def _sum(items: list, name: str) -> torch.Tensor:
    values = [getattr(item, name).detach().double() for item in items]
    return torch.stack([v.to(values[0].device) for v in values]).sum(dim=0)


def _mean(items: list, name: str) -> torch.Tensor:
    values = [getattr(item, name).detach().float() for item in items]
    return torch.stack([v.to(values[0].device) for v in values]).mean(dim=0)


def _number(value: torch.Tensor) -> float | list[float]:
    value = value.detach().float().cpu()
    return value.item() if value.numel() == 1 else value.tolist()
