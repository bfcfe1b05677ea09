"""Plan a run before it starts: parameters, memory per GPU and FLOPs per byte of a training config.

    plan = make_plan(load_config("configs/synergy-1b.yaml"), gpus=8, gpu_memory=80 * GiB)
    print(format_plan(plan))

The model is built on the `meta` device (shapes only: no memory, no initialisation), so the parameter
counts are the real model's. Memory per GPU follows the ZeRO accounting (Rajbhandari et al. 2020) for the
way this project trains: float32 parameters, gradients and AdamW moments (bf16 runs compute under
autocast and keep float32 parameters, train/ds_config.py), partitioned over the data-parallel ranks by
the ZeRO stage; expert parameters are split over the expert-parallel group first and partitioned over
the ranks holding the same experts. Activations are an estimate per position of each layer (the tensors
autograd keeps for backward, counted from the layers' code in model/) at the configured micro-batch and
the target bytes per concept of each stage; tests/test_plan.py checks it against the bytes autograd
really saves on a small model. It follows the PyTorch paths: mamba_ssm's fused scan keeps fewer
intermediates, so on GPUs with that kernel the activation figure is an upper bound. DeepSpeed's
communication buckets and the CUDA context come on top as `buffers`; allocator fragmentation does not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from synergy_dist.config import Config, set_expert_parallel_size
from synergy_dist.model.accounting import cumulative_bytes_per_concept, flops_per_byte, param_counts
from synergy_dist.model.config import MambaConfig, ModelConfig, StackConfig, mlp_hidden
from synergy_dist.model.synergy import SynergyLM
from synergy_dist.train.ds_config import build_ds_config

GiB = 1024**3
CUDA_CONTEXT_BYTES = 0.5 * GiB  # CUDA context, cuBLAS/NCCL workspaces: measured ~0.4-0.6 GiB on recent GPUs
# DeepSpeed's defaults when the config does not set them (deepspeed/runtime/zero/config.py)
DS_DEFAULT_BUCKET = 500_000_000  # reduce_bucket_size and allgather_bucket_size, elements
DS_DEFAULT_MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters, elements
DS_DEFAULT_PREFETCH = 50_000_000  # stage3_prefetch_bucket_size, elements


class PlanError(ValueError):
    """A plan that cannot be made (GPU count not divisible by the expert-parallel size, ...)."""


@dataclass
class Plan:
    gpus: int
    gpu_memory: float  # bytes
    zero_stage: int
    expert_parallel_size: int
    micro_batch_size: int
    seq_len: int
    dtype: str  # "bf16" (autocast, float32 parameters), "fp16" or "fp32"
    activation_checkpointing: bool
    params_total: int
    params_active: int  # per byte: dense parameters plus top_k / n_experts of the experts
    params_experts: int
    params_per_gpu: int  # parameters this GPU holds before ZeRO partitioning (its experts only)
    flops_per_byte_train: float  # forward + backward
    flops_per_byte_forward: float
    memory: dict  # bytes per GPU: weights, gradients, optimizer, autocast_copies, activations, buffers
    memory_total: float
    host_memory: float  # bytes per GPU offloaded to CPU memory (ZeRO-Offload)
    fits: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _bytes_per_param(dtype: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter. fp16: DeepSpeed keeps fp16 weights and gradients and a
    float32 master copy with the two AdamW moments in the optimizer; fp32 and bf16 (autocast): float32 throughout."""
    return (2, 2, 12) if dtype == "fp16" else (4, 4, 8)


def resolved_dtype(cfg: Config) -> str:
    """precision.dtype for a GPU run: "auto" means bf16 on the GPUs this plans for (Ampere and newer)."""
    return "bf16" if cfg.precision.dtype == "auto" else cfg.precision.dtype


# ----------------------------------------------------------------------------- activations


def _act_sizes(dtype: str) -> tuple[int, int, int]:
    """(a, r, s): bytes of a matmul input/output, of the residual stream, of the float32 scans and routers.
    Under bf16 autocast the matmuls save bf16 copies while the stream (float32 parameters) stays float32."""
    if dtype == "fp32":
        return 4, 4, 4
    return 2, (2 if dtype == "fp16" else 4), 4


def _attention_bytes(h: int, stack: StackConfig, a: int, r: int) -> float:
    """Per position: pre-norm input, qkv input, q/k/v/output of SDPA (flash-style: no T x T matrix), the
    reshaped output that the out projection keeps, and the RoPE / qk-norm intermediates."""
    inner = stack.n_heads * (stack.head_dim or h // stack.n_heads)
    total = r * h + a * h + a * 5 * inner + 4 * stack.n_heads
    if stack.qk_norm:
        total += a * 2 * inner
    if stack.pos_encoding == "rope":
        total += a * 2 * inner
    return total


def _mamba_bytes(h: int, m: MambaConfig, a: int, r: int, s: int) -> float:
    """Per position: norm and in_proj inputs, the projection's output, convolution input/output/activation, the
    float32 chunked scan (inputs, within-chunk decay and C.B matrices, chunk states), gate, norm and out_proj input."""
    d_inner = int(m.expand * h)
    heads, conv = d_inner // m.head_dim, d_inner + 2 * m.d_state
    total = r * h + a * h + a * (2 * d_inner + 2 * m.d_state + heads) + 3 * a * conv + 2 * a * heads
    total += s * (conv + heads)  # scan inputs in float32
    total += s * (3 * heads * m.chunk_size + m.chunk_size)  # per chunk: decay segments, their exp, C.B (Q x Q)
    total += s * 2 * heads * m.head_dim * m.d_state / m.chunk_size  # chunk states and the carried states
    total += s * 4 * d_inner + 2 * a * d_inner  # y, y + Dx, gated product and norm input; z and out_proj input
    return total


def _ffn_bytes(h: int, stack: StackConfig, is_moe: bool, has_mlp: bool, a: int, r: int, s: int) -> float:
    if is_moe:
        moe = stack.moe
        f = moe.d_ff or mlp_hidden(h, stack.mlp_ratio)
        copies = moe.top_k + (1 if moe.shared_expert else 0)
        # float32 gate (input, logits, probabilities), and per routed copy: the dispatched input, SwiGLU, the output
        return r * h + s * h + s * 3 * moe.n_experts + copies * a * (2 * h + 4 * f)
    if has_mlp:
        f = mlp_hidden(h, stack.mlp_ratio)
        return r * h + a * h + a * 4 * f
    return 0.0


def stack_activation_bytes(stack: StackConfig, h: int, positions: float, dtype: str,
                           checkpointing: bool) -> tuple[float, float]:
    """(bytes kept for backward by one network over `positions` units, bytes of its largest block): with
    activation checkpointing a dense block keeps only its input and recomputes the rest in backward."""
    a, r, s = _act_sizes(dtype)
    moe_at = set(stack.moe_layer_indices())
    kept, largest = r * h * positions, 0.0  # the final norm's input
    for i, letter in enumerate(stack.layers):
        mixer = _attention_bytes(h, stack, a, r) if letter == "A" else _mamba_bytes(h, stack.mamba, a, r, s)
        has_mlp = stack.mlp_ratio > 0 and (letter == "A" or stack.mlp_on_mamba)
        block = (mixer + _ffn_bytes(h, stack, i in moe_at, has_mlp, a, r, s)) * positions
        largest = max(largest, block)
        kept += r * h * positions if (checkpointing and i not in moe_at) else block
    return kept, largest


def activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, dtype: str, checkpointing: bool,
                     bytes_per_concept: float | list[float] | None = None, working_set: bool = True) -> float:
    """Bytes autograd keeps for one micro-batch's backward, plus (working_set) the recomputation of the largest block
    under activation checkpointing. bytes_per_concept as for accounting.flops_breakdown: cumulative after each
    stage, or the innermost level's, or None = the routers' targets, which a trained router meets."""
    bytes_per_concept = cumulative_bytes_per_concept(model, bytes_per_concept)
    a, r, s = _act_sizes(dtype)
    d0 = model.widths()[0]
    # embedding output, the head's input and logits, the float32 logits and log-probabilities of the loss
    total = seq_len * (r * d0 + a * d0 + a * model.vocab_size + s * 2 * model.vocab_size)
    largest, units = 0.0, float(seq_len)  # positions at the current level, per sequence
    for stage, cumulative in zip(model.stages, bytes_per_concept):
        h = stage.d_model
        for stack in (stage.encoder, stage.decoder):
            kept, big = stack_activation_bytes(stack, h, units, dtype, checkpointing)
            total, largest = total + kept, max(largest, big)
        # router projections and scores, downsample/upsample gathers, smoothing, float32 residual projection
        total += units * (a * 3 * h + s * 3 * h + r * 4 * h)
        units = seq_len / cumulative
    kept, big = stack_activation_bytes(model.middle, model.d_middle, max(units, 1.0), dtype, checkpointing)
    total, largest = total + kept, max(largest, big)
    return micro_batch * (total + (largest if checkpointing and working_set else 0.0))


# ----------------------------------------------------------------------------- the plan


def _zero_buffers(cfg: Config, zero_stage: int, weight_bytes: int) -> float:
    """DeepSpeed's communication buffers per GPU for the configured (or default) bucket sizes."""
    zero = _deepspeed_zero_section(cfg)
    if zero_stage in (1, 2):
        reduce = zero.get("reduce_bucket_size", DS_DEFAULT_BUCKET)
        gather = zero.get("allgather_bucket_size", DS_DEFAULT_BUCKET)
        return float(reduce * 4 + gather * weight_bytes) if zero_stage == 2 else float(gather * weight_bytes)
    if zero_stage == 3:
        live = zero.get("stage3_max_live_parameters", DS_DEFAULT_MAX_LIVE)
        prefetch = zero.get("stage3_prefetch_bucket_size", DS_DEFAULT_PREFETCH)
        return float((live + prefetch) * weight_bytes)
    return 0.0


def _deepspeed_zero_section(cfg: Config) -> dict:
    """The zero_optimization settings a run would use (train/ds_config.py: deepspeed.extra_json and extra merged)."""
    return build_ds_config(cfg, world_size=1, dtype=torch.float32)["zero_optimization"]


def make_plan(cfg: Config, gpus: int, gpu_memory: float, micro_batch_size: int | None = None) -> Plan:
    """The plan of `cfg` on `gpus` GPUs of `gpu_memory` bytes each (micro_batch_size overrides the config's)."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus} must be >= 1")
    ep = cfg.deepspeed.expert_parallel_size
    if gpus % ep:
        raise PlanError(f"--gpus {gpus} is not a multiple of deepspeed.expert_parallel_size={ep}: "
                        "use a multiple, or set deepspeed.expert_parallel_size=<a divisor of the GPU count>")
    stage = cfg.deepspeed.zero_stage
    dtype = resolved_dtype(cfg)
    micro = micro_batch_size or cfg.batch.micro_batch_size
    set_expert_parallel_size(cfg, 1)  # count every expert once, on one process
    with torch.device("meta"):
        counts = param_counts(SynergyLM(cfg.model))
    set_expert_parallel_size(cfg, ep)
    dense, experts = counts["total"] - counts["experts"], counts["experts"]
    local_experts = experts / ep  # this GPU's experts, before ZeRO partitioning
    expert_dp = gpus // ep  # ranks holding the same experts
    w, g, o = _bytes_per_param(dtype)

    def partitioned(bytes_per_param: int, from_stage: int) -> float:
        if stage >= from_stage:
            return bytes_per_param * (dense / gpus + local_experts / expert_dp)
        return bytes_per_param * (dense + local_experts)

    memory = {
        "weights": partitioned(w, 3),
        "gradients": partitioned(g, 2),
        "optimizer": partitioned(o, 1),
        # bf16 autocast casts each weight once per forward and keeps the copy for backward (ZeRO-3: gathered
        # layer by layer, the largest live set is bounded by the buffers below)
        "autocast_copies": 2 * (dense + local_experts) if (dtype == "bf16" and stage < 3) else 0.0,
        "activations": activation_bytes(cfg.model, cfg.data.seq_len, micro, dtype,
                                         cfg.deepspeed.activation_checkpointing),
        "buffers": _zero_buffers(cfg, stage, 2 if dtype != "fp32" else 4) + CUDA_CONTEXT_BYTES,
    }
    host = 0.0
    if cfg.deepspeed.offload_optimizer:
        host += memory["optimizer"]
        memory["optimizer"] = 0.0
    if cfg.deepspeed.offload_param and stage == 3:
        host += memory["weights"]
        memory["weights"] = 0.0
    total = sum(memory.values())
    return Plan(
        gpus=gpus, gpu_memory=gpu_memory, zero_stage=stage, expert_parallel_size=ep, micro_batch_size=micro,
        seq_len=cfg.data.seq_len, dtype=dtype, activation_checkpointing=cfg.deepspeed.activation_checkpointing,
        params_total=counts["total"], params_active=counts["active"], params_experts=experts,
        params_per_gpu=int(dense + local_experts),
        flops_per_byte_train=flops_per_byte(cfg.model, cfg.data.seq_len, training=True),
        flops_per_byte_forward=flops_per_byte(cfg.model, cfg.data.seq_len, training=False),
        memory=memory, memory_total=total, host_memory=host, fits=total <= gpu_memory,
    )


def _giga(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def format_plan(plan: Plan, name: str = "") -> str:
    """A short table for a terminal."""
    zero_note = {0: "replicated", 1: "optimizer partitioned", 2: "optimizer + gradients partitioned",
                 3: "everything partitioned"}[plan.zero_stage]
    lines = [
        f"plan {name}: {plan.gpus} GPU(s) x {plan.gpu_memory / GiB:.1f} GiB, ZeRO-{plan.zero_stage} ({zero_note}), "
        f"expert parallel {plan.expert_parallel_size}, {plan.dtype}, micro-batch {plan.micro_batch_size} x "
        f"{plan.seq_len} bytes, activation checkpointing {'on' if plan.activation_checkpointing else 'off'}",
        f"  parameters   total {_giga(plan.params_total)}, active {_giga(plan.params_active)}, "
        f"experts {_giga(plan.params_experts)}; held per GPU before partitioning {_giga(plan.params_per_gpu)}",
        f"  FLOPs/byte   training {plan.flops_per_byte_train / 1e9:.3f} G, "
        f"forward {plan.flops_per_byte_forward / 1e9:.3f} G (at the routers' target bytes per concept)",
        "  memory per GPU (GiB)",
    ]
    for part, value in plan.memory.items():
        lines.append(f"    {part:<16} {value / GiB:8.2f}")
    share = plan.memory_total / plan.gpu_memory
    lines.append(f"    {'total':<16} {plan.memory_total / GiB:8.2f}  ({share:.0%} of {plan.gpu_memory / GiB:.1f})")
    if plan.host_memory:
        lines.append(f"  offloaded to host memory per GPU: {plan.host_memory / GiB:.2f} GiB")
    return "\n".join(lines)


def misfit_warning(plan: Plan) -> str | None:
    """One line naming the shortfall and the fixes, or None when the plan fits."""
    if plan.fits:
        return None
    return (f"warning: the plan needs {plan.memory_total / GiB:.1f} GiB per GPU but a GPU has "
            f"{plan.gpu_memory / GiB:.1f} GiB: lower batch.micro_batch_size, set "
            "deepspeed.activation_checkpointing=true, raise deepspeed.zero_stage (or offload), or use more GPUs")


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '141 GiB', '40960MiB' -> bytes."""
    units = {"gib": GiB, "gb": 1e9, "mib": 1024**2, "mb": 1e6, "tib": 1024**4, "tb": 1e12}
    cleaned = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if cleaned.endswith(unit):
            try:
                value = float(cleaned[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return value * units[unit]
            break
    raise PlanError(f"--gpu-memory {text!r} is not a memory size; write e.g. 80GiB, 141GB or 40960MiB")
