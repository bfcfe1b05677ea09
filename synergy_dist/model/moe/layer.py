"""Mixture-of-Experts feed-forward layer: fp32 gate, load balancing, z-loss, capacity or dropless, expert parallel.

forward(x (B, T, D), valid (B, T) bool | None) -> (y (B, T, D), MoEStats). Only valid tokens reach an expert
and count in the losses and statistics; padding tokens get y = 0 (they are masked, not removed: no host sync).
The gate and routing math live in gating.py, the losses in losses.py, the load statistics in statistics.py, the
experts in experts.py and the token exchange between ranks in expert_parallel.py. See docs/MOE.md for how the
trainer wires it up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from synergy_dist.accelerator import set_deepspeed_accelerator
from synergy_dist.model.config import MoEConfig
from synergy_dist.model.moe.expert_parallel import (
    expert_group_name,
    get_expert_parallel_group,
    init_expert_parallel_groups,
    run_experts_parallel,
)
from synergy_dist.model.moe.experts import LocalExperts, SwiGLUExpert
from synergy_dist.model.moe.gating import (
    ExpertGate,
    Routing,
    capacity_keep_mask,
    expert_capacity,
    multiplicative_jitter,
    route_sigmoid_bias,
    route_softmax,
)
from synergy_dist.model.moe.losses import router_z_loss, sequence_balance_loss, switch_aux_loss
from synergy_dist.model.moe.statistics import MoEStats, expert_counts, load_statistics
from synergy_dist.model.precision import KeepsFloat32

set_deepspeed_accelerator()
try:  # DeepSpeed's engine only treats a model as MoE (expert groups, MoE optimizer groups, expert checkpoint
    # files) when it finds an instance of this class (engine._configure_distributed_model), so we subclass it.
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE  # optional; after set_deepspeed_accelerator() above
except ImportError:  # the layer works without DeepSpeed (export, evaluation)
    _DeepSpeedMoE = nn.Module

class MoEFeedForward(KeepsFloat32, _DeepSpeedMoE):
    """x: (B, T, D) concept states, valid: (B, T) bool mask of real (non-padding) tokens or None.

    forward returns (y of shape (B, T, D), MoEStats). Padding tokens are not routed and get y = 0.
    With expert_parallel_size > 1 every rank of the expert-parallel group must call forward (and backward) the
    same number of times, also with zero valid tokens; training forwards all-reduce the expert counts over the
    world (the data-parallel group) so the balancing loss and the bias update see the global batch.
    """

    def __init__(self, d_model: int, d_ff_dense: int, cfg: MoEConfig):
        nn.Module.__init__(self)  # skip deepspeed MoE.__init__: we only borrow its type (see the import above)
        cfg.validate()
        self.cfg = cfg
        self.d_model = d_model
        self.d_ff = cfg.d_ff or d_ff_dense
        # attributes DeepSpeed's engine reads from MoE layers (checkpointing, group set-up)
        self.num_experts = cfg.n_experts
        self.ep_size = cfg.expert_parallel_size
        self.num_local_experts = cfg.n_experts // cfg.expert_parallel_size
        self.expert_group_name = expert_group_name(cfg.expert_parallel_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

        self.ep_group = None
        self.ep_rank = 0
        if self.ep_size > 1:
            init_expert_parallel_groups(self.ep_size)
            self.ep_group = get_expert_parallel_group(self.ep_size)
            self.ep_rank = dist.get_rank(self.ep_group)
        self.balance_group = None  # process group for the global expert counts; None = world

        self.router = ExpertGate(d_model, cfg.n_experts, cfg.router_init_std)
        self.deepspeed_moe = LocalExperts(d_model, self.d_ff, self.num_local_experts,
                                          first_expert=self.ep_rank * self.num_local_experts,
                                          seed=cfg.expert_init_seed, group_name=self.expert_group_name)
        # "shared_mlp", not "shared_expert": DeepSpeed treats every state key of an MoE layer containing
        # "expert" as a per-expert weight when checkpointing.
        generator = torch.Generator().manual_seed(cfg.expert_init_seed + cfg.n_experts)
        self.shared_mlp = SwiGLUExpert(d_model, self.d_ff, generator) if cfg.shared_expert else None
        # sigmoid_bias balancing state: the bias is checkpointed, the load accumulator is per optimizer step
        self.register_buffer("selection_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        self.register_buffer("load_since_update", torch.zeros(cfg.n_experts, dtype=torch.float64), persistent=False)
        self.route_dropless = False  # set by dropless_routing() around forwards with a cache

    def restore_float32(self) -> int:
        """The balancing state back to its dtypes after a blanket cast: selection bias float32, load float64."""
        changed = super().restore_float32()
        self.load_since_update.data = self.load_since_update.data.double()
        return changed

    @property
    def local_experts(self) -> LocalExperts:
        return self.deepspeed_moe

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by deepspeed.initialize on every module that has it: make sure the groups exist."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_ is not supported by MoEFeedForward: "
                             "remove it from the DeepSpeed config")
        if dist.is_initialized():
            init_expert_parallel_groups(self.ep_size)
            if self.ep_size > 1:
                self.ep_group = get_expert_parallel_group(self.ep_size)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None):  # -> tuple[Tensor, MoEStats]
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoEFeedForward expects x of shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        batch, length, d_model = x.shape
        tokens = x.reshape(batch * length, d_model)
        if valid is not None and (valid.shape != (batch, length) or valid.dtype != torch.bool):
            raise ValueError(f"valid must be a bool tensor of shape {(batch, length)}, "
                             f"got {valid.dtype} {tuple(valid.shape)}")
        # Every token is routed and padding is masked out afterwards: selecting the valid tokens first would
        # cost a host synchronisation (nonzero) per layer on top of the expert sizes _run_experts needs.
        mask = None if valid is None else valid.reshape(-1)
        sequence_of = torch.arange(batch * length, device=x.device) // length  # for the sequence-wise balance loss

        logits, decision = self._route(tokens)
        keep = self._capacity_mask(decision.expert_ids, mask)
        routed = self._run_experts(tokens, decision, keep, mask)
        if self.shared_mlp is not None:
            routed = routed + self.shared_mlp(tokens)
        if mask is not None:
            routed = torch.where(mask.unsqueeze(1), routed, 0.0)  # padding gets y = 0
        y = routed.reshape(batch, length, d_model)
        return y, self._stats(logits, decision, keep, mask, sequence_of, batch)

    def _route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        router_input = tokens
        if self.training and self.cfg.jitter > 0:
            router_input = multiplicative_jitter(tokens.float(), self.cfg.jitter)
        logits = self.router(router_input)
        if self.cfg.scoring == "softmax":
            return logits, route_softmax(logits, self.cfg.top_k)
        return logits, route_sigmoid_bias(logits, self.cfg.top_k, self.selection_bias)

    def _capacity_mask(self, expert_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """None when routing dropless (the config, a cached forward, or eval without capacity_factor_eval);
        else which assignments fit (capacity from this rank's valid tokens, padding never takes a slot)."""
        factor = self.cfg.capacity_factor_train if self.training else self.cfg.capacity_factor_eval
        if self.cfg.dropless or self.route_dropless or factor is None:
            return None
        n_valid = expert_ids.shape[0] if mask is None else mask.sum()
        capacity = expert_capacity(n_valid, self.cfg.top_k, self.cfg.n_experts, factor, self.cfg.min_capacity)
        return capacity_keep_mask(self._masked_ids(expert_ids, mask), self.cfg.n_experts, capacity)

    def _masked_ids(self, expert_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """expert_ids with every assignment of a padding token moved to expert n_experts, which does not exist:
        sorted after the real experts and counted apart, it is never run (no data-dependent shapes)."""
        return expert_ids if mask is None else expert_ids.masked_fill(~mask.unsqueeze(1), self.cfg.n_experts)

    def _run_experts(self, tokens: torch.Tensor, decision: Routing, keep: torch.Tensor | None,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """Sort the routed (token, expert) assignments by expert, run experts on contiguous slices, gate and sum.
        Padding tokens' and dropped assignments go to the non-existent expert n_experts, sorted last, not run."""
        n_tokens, top_k = decision.expert_ids.shape
        n_experts = self.cfg.n_experts
        expert_ids = self._masked_ids(decision.expert_ids, mask)
        if keep is not None:
            expert_ids = expert_ids.masked_fill(~keep, n_experts)
        expert_ids = expert_ids.reshape(-1)
        token_ids = torch.arange(n_tokens, device=tokens.device).unsqueeze(1).expand(n_tokens, top_k).reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        token_ids, gates = token_ids[order], decision.gates.reshape(-1)[order]
        counts = torch.bincount(expert_ids, minlength=n_experts + 1)
        # The one host synchronisation of the layer: the experts' slice sizes (as in any dropless MoE that runs
        # experts on variable-length slices; expert parallelism needs them for its all-to-all too).
        sizes = counts.tolist()
        n_routed = sum(sizes[:n_experts])
        token_ids, gates = token_ids[:n_routed], gates[:n_routed]
        sorted_tokens = tokens.index_select(0, token_ids)
        if self.ep_size > 1:
            expert_out = run_experts_parallel(sorted_tokens, counts[:n_experts], self.local_experts, self.ep_group)
        else:
            expert_out = self.local_experts(sorted_tokens, sizes[:n_experts])
        weighted = expert_out * gates.to(expert_out.dtype).unsqueeze(1)
        return weighted.new_zeros((n_tokens, tokens.shape[1])).index_add(0, token_ids, weighted)

    # ------------------------------------------------------------------ losses and statistics

    def _stats(self, logits: torch.Tensor, decision: Routing, keep: torch.Tensor | None, mask: torch.Tensor | None,
               sequence_of: torch.Tensor, n_sequences: int) -> MoEStats:
        """Losses and load statistics over the valid tokens only (mask: which of the routed tokens are real)."""
        n_experts = self.cfg.n_experts
        counts = expert_counts(self._masked_ids(decision.expert_ids, mask), n_experts)
        weight = None if mask is None else mask.to(decision.probs.dtype)
        n_valid = torch.tensor(float(logits.shape[0]), dtype=torch.float64, device=logits.device) \
            if mask is None else mask.sum().to(torch.float64)
        n_assignments = n_valid * self.cfg.top_k
        dropped = torch.zeros((), dtype=torch.float64, device=logits.device)
        if keep is not None:
            dropped_assignments = ~keep if mask is None else ~keep & mask.unsqueeze(1)
            dropped = dropped_assignments.sum().to(torch.float64)
        summary = torch.cat([counts, torch.stack([n_assignments, dropped])])
        if self.training and dist.is_initialized():
            dist.all_reduce(summary, group=self.balance_group)  # global batch: f_i and the bias see every rank
        counts, n_assignments, dropped = summary[:n_experts], summary[n_experts], summary[n_experts + 1]
        if self.training:
            self.load_since_update += counts

        if self.cfg.scoring == "sigmoid_bias":  # DeepSeek-V3: the bias balances the batch, this loss each sequence
            aux = sequence_balance_loss(decision.probs, decision.expert_ids, sequence_of, n_sequences, weight)
        else:
            aux = switch_aux_loss(decision.probs, counts, n_assignments, weight)
        z = router_z_loss(logits, weight)
        load = load_statistics(counts)
        with torch.no_grad():
            per_token = logits.float().square().mean(dim=-1)
            w = torch.ones_like(per_token) if weight is None else weight.float()
            rms = ((per_token * w).sum() / w.sum().clamp_min(1)).sqrt()
        return MoEStats(
            aux_loss=aux,
            z_loss=z,
            loss=self.cfg.aux_loss_weight * aux + self.cfg.z_loss_coef * z,
            tokens_per_expert=counts.float(),
            dropped_fraction=(dropped / n_assignments.clamp_min(1)).float(),
            load_entropy=load.load_entropy,
            max_over_mean_load=load.max_over_mean_load,
            router_logit_rms=rms.float(),
        )

    # ------------------------------------------------------------------ aux-loss-free balancing

    @torch.no_grad()
    def update_bias(self) -> None:
        """Once per optimizer step: nudge the selection bias of sigmoid_bias scoring towards balanced load.

        b_i += rate * sign(mean_j load_j - load_i) with the loads accumulated over the step's forwards (global
        counts, so every rank applies the same update). Resets the accumulator; a no-op for softmax scoring.
        """
        load = self.load_since_update
        if self.cfg.scoring == "sigmoid_bias" and load.sum() > 0:
            self.selection_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load).float()
        load.zero_()


@contextmanager
def dropless_routing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block (when enabled) every MoE layer of `model` routes every token, whatever its capacity
    settings. SynergyLM wraps each forward with a cache in it: a decoded token alone never fills an expert, so
    capacity would make cached generation differ from recomputing the whole sequence."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)] if enabled else []
    for layer in layers:
        layer.route_dropless = True
    try:
        yield
    finally:
        for layer in layers:
            layer.route_dropless = False


def update_moe_biases(model: nn.Module) -> int:
    """Call once per optimizer step (the trainer does): update_bias() of every MoE layer. Returns the layer count."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for layer in layers:
        layer.update_bias()
    return len(layers)


def moe_param_groups(model_or_groups: nn.Module | list[dict] | dict) -> list[dict]:
    """Optimizer parameter groups in the form DeepSpeed needs for MoE models.

    Expert parameters (allreduce=False) move into their own groups marked {"moe": True, "name": group_name},
    one per source group, with the source group's options (lr, weight_decay, ...) copied. Dense groups keep
    their parameters. Groups left empty are dropped. Pass the model (one group of all trainable parameters) or
    a list of groups (each may carry a "name"; unnamed ones are named "group<i>").
    """
    if isinstance(model_or_groups, nn.Module):
        source = [{"name": "params", "params": [p for p in model_or_groups.parameters() if p.requires_grad]}]
    elif isinstance(model_or_groups, dict):
        source = [dict(model_or_groups)]
    else:
        source = [dict(group) for group in model_or_groups]
    result: list[dict] = []
    for i, group in enumerate(source):
        params = list(group["params"])
        name = group.get("name", f"group{i}")
        dense = [p for p in params if getattr(p, "allreduce", True)]
        experts: dict[str, list] = {}
        for p in params:
            if not getattr(p, "allreduce", True):
                experts.setdefault(p.group_name, []).append(p)
        if dense:
            result.append({**group, "name": name, "params": dense})
        for group_name, expert_params in experts.items():
            result.append({**group, "name": group_name, "moe": True, "params": expert_params})
    return result


__all__ = ["MoEFeedForward", "dropless_routing", "update_moe_biases", "moe_param_groups"]
