"""Training safeguards: skip non-finite or spiking updates, ask for a rollback after repeated spikes,
and raise router-health alarms.

Every input is a globally reduced value (the mean loss over all ranks, the global grad norm), so
each rank reaches the same verdict without extra communication.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

from synergy_dist.config import SafeguardConfig
from synergy_dist.model.moe.statistics import dead_experts, load_entropy_ratio
from synergy_dist.model.statistics import ModelStatistics


@dataclass
class Verdict:
    apply: bool  # take the optimizer step
    reason: str  # "ok" | "nonfinite" | "loss_spike" | "grad_spike"
    rollback: bool = False  # too many spikes in a row: restore the last good checkpoint


@dataclass
class SafeguardState:
    losses: list = field(default_factory=list)  # recent applied-step losses (window)
    grad_norms: list = field(default_factory=list)  # recent applied-step grad norms (window)
    consecutive_spikes: int = 0
    skipped_nonfinite: int = 0
    skipped_spikes: int = 0
    rollbacks: list = field(default_factory=list)  # {"at_step", "to_step", "skipped_samples": [lo, hi]}


def is_spike(value: float, history: list, zscore: float, ratio: float) -> bool:
    """Whether `value` stands out from `history` both statistically (more than `zscore` robust standard
    deviations above its median) and in absolute terms (more than `ratio` times its median).

    The z-score alone calls ordinary noise a spike once the window is very steady (a grad norm of
    1.04 over a mean of 0.8 was 6 sigma out in a healthy run); the ratio alone would call the
    normal swings of a noisy quantity spikes. Median and MAD (scaled to a normal's sigma) rather than
    mean and standard deviation: the natural outliers of early training (grad norms 20x the median)
    would otherwise widen the window's spread so much that a real spike went unseen until they left it."""
    ordered = sorted(history)
    center = statistics.median(ordered)
    if value <= ratio * center:
        return False
    spread = 1.4826 * statistics.median(abs(x - center) for x in ordered)
    # A floor on the spread: a perfectly flat history must not turn tiny wiggles into spikes.
    spread = max(spread, 1e-3 * abs(center), 1e-8)
    return (value - center) / spread > zscore


class Safeguards:
    def __init__(self, cfg: SafeguardConfig):
        self.cfg = cfg
        self.state = SafeguardState()

    def judge(self, loss: float, grad_norm: float | None) -> Verdict:
        """Decide whether this step's update is applied. Pure: `record` updates the state."""
        values = [loss] + ([grad_norm] if grad_norm is not None else [])
        if self.cfg.skip_nonfinite and not all(math.isfinite(v) for v in values):
            return Verdict(apply=False, reason="nonfinite")
        cfg, st = self.cfg, self.state
        if cfg.spike_zscore > 0 and len(st.losses) >= cfg.spike_min_history:
            reason = None
            if is_spike(loss, st.losses, cfg.spike_zscore, cfg.spike_ratio):
                reason = "loss_spike"
            elif grad_norm is not None and st.grad_norms and is_spike(grad_norm, st.grad_norms, cfg.spike_zscore,
                                                                      cfg.spike_ratio):
                reason = "grad_spike"
            if reason:
                rollback = st.consecutive_spikes + 1 >= cfg.max_consecutive_spikes
                return Verdict(apply=False, reason=reason, rollback=rollback)
        return Verdict(apply=True, reason="ok")

    def record(self, verdict: Verdict, loss: float, grad_norm: float | None) -> None:
        st, window = self.state, self.cfg.spike_window
        if verdict.reason == "nonfinite":
            st.skipped_nonfinite += 1
            return
        if not verdict.apply:
            st.skipped_spikes += 1
            st.consecutive_spikes = 0 if verdict.rollback else st.consecutive_spikes + 1
            return
        st.consecutive_spikes = 0
        st.losses = (st.losses + [loss])[-window:]
        if grad_norm is not None and math.isfinite(grad_norm):
            st.grad_norms = (st.grad_norms + [grad_norm])[-window:]

    def record_rollback(self, at_step: int, to_step: int, skipped_samples: tuple[int, int]) -> None:
        self.state.rollbacks.append({"at_step": at_step, "to_step": to_step, "skipped_samples": list(skipped_samples)})

    # ------------------------------------------------------------------ router health
    def router_alarms(self, stats: ModelStatistics, targets: dict[str, float]) -> dict[str, str]:
        """Alarms for compression outside the band or collapsing expert load, as {kind: text}.

        stats: the model's statistics; targets: stage name -> the stage's target inputs per concept."""
        alarms = {}
        lo, hi = self.cfg.compression_band
        for s, stage in enumerate(stats.stages):
            name = f"stage{s}"
            if name not in targets:
                continue
            realised, target = float(stage.compression), targets[name]  # this stage's inputs per concept
            if not lo <= realised / target <= hi:
                alarms[f"{name}/compression"] = (f"{name}: realised {realised:.2f} inputs/concept is outside "
                              f"[{lo * target:.2f}, {hi * target:.2f}] (target {target:g})")
        for name, moe in stats.moe.items():
            loads = moe.tokens_per_expert.tolist()
            if len(loads) < 2 or sum(loads) <= 0:
                continue
            layer = f"moe/{name}"
            dead = dead_experts(loads, self.cfg.dead_expert_fraction)
            if dead:
                alarms[f"{layer}/dead_experts"] = (
                    f"{layer}: dead experts {dead} (load < {self.cfg.dead_expert_fraction:g} x mean)"
                )
            entropy_ratio = load_entropy_ratio(loads)
            if entropy_ratio < self.cfg.min_load_entropy_ratio:
                alarms[f"{layer}/load_entropy"] = (
                    f"{layer}: expert load entropy {entropy_ratio:.2f} of the maximum is below "
                    f"{self.cfg.min_load_entropy_ratio:g}"
                )
        return alarms

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = SafeguardState(**state)
