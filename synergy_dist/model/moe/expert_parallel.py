"""Expert parallelism: DeepSpeed's expert process groups and the variable-split all-to-all that moves tokens.

Ranks hold different numbers of concept tokens (the boundary router decides per sequence), so tokens travel
with `all_to_all_single` and per-rank split sizes (gloo implements it as alltoallv; NCCL natively). Each MoE
forward enters exactly three collectives on every rank of the expert-parallel group, whatever the token counts
(zero included): one all-to-all of per-expert counts, one of tokens out, one of results back; backward enters
two (the transposes of the token exchanges).

Groups: DeepSpeed keeps them in deepspeed.utils.groups under the name "ep_size_<n>"; the engine looks them up by
the `group_name` attribute of expert parameters to reduce expert gradients over the expert-data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from synergy_dist.model.moe.experts import LocalExperts


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel / expert-data-parallel groups of this size."""
    return f"ep_size_{ep_size}"


def init_expert_parallel_groups(ep_size: int) -> None:
    """Create DeepSpeed's expert-parallel groups of size `ep_size` (idempotent; a collective on all ranks).

    Call it on every rank after torch.distributed is initialised and before building the model; the model
    constructor calls it too, and deepspeed.initialize reuses the same groups. Layout (DeepSpeed's default):
    expert-parallel groups are consecutive ranks [0..ep-1], [ep..2ep-1], ...; expert-data-parallel groups are
    the ranks holding the same experts (ranks i, i+ep, i+2ep, ...).
    """
    if not dist.is_initialized():
        raise RuntimeError(
            f"expert_parallel_size={ep_size} needs torch.distributed: initialise the process group "
            "(deepspeed.init_distributed or torch.distributed.init_process_group) before building the model")
    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"expert_parallel_size={ep_size} must divide the world size {world}: "
                         "set it to a divisor of the number of ranks")
    import deepspeed  # heavy (~1.2 s); only expert parallelism needs its groups
    from deepspeed.utils import groups  # heavy, as above

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing group, initialises nothing new
    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


def get_expert_parallel_group(ep_size: int):
    """This rank's expert-parallel process group (created by init_expert_parallel_groups)."""
    from deepspeed.utils import groups  # heavy (~1.2 s); only expert parallelism needs its groups

    return groups._get_expert_parallel_group(expert_group_name(ep_size))


class _AllToAllVariable(torch.autograd.Function):
    """all_to_all_single with per-rank split sizes; backward is the same exchange with the splits swapped.

    `anchor` is a leaf that requires grad, passed only so that the output always joins the autograd graph:
    then backward (a collective) runs on every rank, also on one whose own tokens need no gradient.
    """

    @staticmethod
    def forward(ctx, x, anchor, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.input_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None, None


def all_to_all_variable(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Send rows input_splits[r] of x to group rank r; receive output_splits[r] rows from rank r."""
    if torch.is_grad_enabled():
        anchor = torch.zeros((), requires_grad=True)
        return _AllToAllVariable.apply(x, anchor, output_splits, input_splits, group)
    return _AllToAllVariable.apply(x, None, output_splits, input_splits, group)


def _source_major_to_expert_major(received_counts: torch.Tensor) -> torch.Tensor:
    """Index that reorders received rows from (source rank, local expert) order to (local expert, source) order.

    received_counts: (P, L) rows received from source p for local expert l.
    """
    n_sources, n_local = received_counts.shape
    flat = received_counts.reshape(-1)
    start = torch.cumsum(flat, 0) - flat  # where segment (p, l) begins in the received buffer
    start_em = start.view(n_sources, n_local).t().reshape(-1)
    size_em = received_counts.t().reshape(-1)
    offset_in_em = torch.cumsum(size_em, 0) - size_em  # where segment (l, p) begins after reordering
    total = int(flat.sum())
    return (torch.repeat_interleave(start_em - offset_in_em, size_em, output_size=total)
            + torch.arange(total, device=received_counts.device))


def run_experts_parallel(tokens: torch.Tensor, tokens_per_expert: torch.Tensor, experts: LocalExperts,
                         group) -> torch.Tensor:
    """Run the experts of the whole expert-parallel group on this rank's routed tokens.

    tokens: (M, D) this rank's (token, expert) assignments sorted by global expert id; tokens_per_expert: (E,)
    long. Returns (M, D) expert outputs in the same order. Group rank p holds experts p*L .. p*L + L - 1.
    """
    n_ranks = dist.get_world_size(group)
    n_local = len(experts)
    if tokens_per_expert.numel() != n_ranks * n_local:
        raise ValueError(f"{tokens_per_expert.numel()} experts cannot be split as {n_local} local experts "
                         f"on each of {n_ranks} ranks")
    send_counts = tokens_per_expert.to(torch.int64).contiguous()
    received_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(received_counts, send_counts, group=group)  # equal splits: n_local counts per rank
    received_counts = received_counts.view(n_ranks, n_local)
    input_splits = send_counts.view(n_ranks, n_local).sum(1).tolist()
    output_splits = received_counts.sum(1).tolist()

    received = all_to_all_variable(tokens, output_splits, input_splits, group)
    order = _source_major_to_expert_major(received_counts)
    expert_out = experts(received[order], received_counts.sum(0).tolist())
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return all_to_all_variable(expert_out[inverse], input_splits, output_splits, group)
