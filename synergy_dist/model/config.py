"""Typed configuration of SynergyLM: nested dataclasses that map one to one onto YAML.

A model is a list of hierarchy stages (outermost first) around one middle network:

    bytes -> embed -> [stage 0: encoder -> router -> downsample] -> ... -> middle
          -> ... -> [stage 0: upsample + residual -> decoder] -> byte head

With ``stages=[]`` the middle runs directly on bytes: that is the plain byte-level Transformer
baseline (give its middle RoPE). Fixed-stride and whitespace hierarchies are stages whose router
kind is "stride" or "space". The list form is the recursive H-Net structure written flat: stage
s+1 is the "middle" of stage s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data_pipeline.vocab import VOCAB_SIZE

LAYER_LETTERS = {"A": "causal self-attention", "M": "Mamba-2 style selective SSM"}
ROUTER_KINDS = ("cosine", "gate", "stride", "space")
LEARNED_ROUTER_KINDS = ("cosine", "gate")  # routers with parameters and a ratio loss
WIDTH_CHANGES = ("pad", "linear")
POS_ENCODINGS = ("rope", "none")
MOE_SCORINGS = ("softmax", "sigmoid_bias")
# default balance-loss weight per scoring (MoEConfig.aux_loss_weight): Switch/ST-MoE 1e-2 on the batch; DeepSeek-V3
# balances with the selection bias and keeps a sequence-wise balance loss of 1e-4 (arXiv:2412.19437, sec. 4.2)
DEFAULT_AUX_LOSS_COEF = {"softmax": 0.01, "sigmoid_bias": 1e-4}
N_GPT_BYTES_PER_TOKEN = 4.6  # GPT-2 BPE bytes per token on web text (H-Net Eq. 11)


@dataclass
class MambaConfig:
    d_state: int = 64  # state size per head (N in Mamba-2)
    d_conv: int = 4  # width of the causal depthwise convolution
    expand: float = 2.0  # inner width = expand * d_model
    head_dim: int = 32  # channels per SSM head (P in Mamba-2); inner width must be a multiple
    chunk_size: int = 64  # block length of the chunked scan (CPU: 32..128 is fastest)
    dt_min: float = 1e-3  # initial time-step range (log-uniform)
    dt_max: float = 1e-1
    kernel: str = "auto"  # "auto": mamba_ssm Triton scan when installed and on GPU, else PyTorch | "torch"


@dataclass
class MoEConfig:
    n_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts each token is sent to (Mixtral: 2 of 8)
    d_ff: int = 0  # hidden width of one SwiGLU expert; 0 = same as the dense MLP of the part
    shared_expert: bool = False  # one always-on dense expert added to the routed output
    # "softmax" (softmax over the top-k logits, Mixtral) | "sigmoid_bias" (aux-loss-free, DeepSeek-V3)
    scoring: str = "softmax"
    # balance-loss weight (Switch for softmax, sequence-wise for sigmoid_bias; 0 disables); None = the scoring's
    # literature default (aux_loss_weight)
    aux_loss_coef: float | None = None
    z_loss_coef: float = 1e-3  # router z-loss weight (ST-MoE)
    jitter: float = 0.0  # multiplicative jitter noise on router inputs during training (0 = off)
    dropless: bool = True  # route every token (no capacity); False = capacity factor with token dropping
    capacity_factor_train: float = 1.25  # capacity per expert = factor * tokens * top_k / n_experts (when not dropless)
    # eval-mode forwards without a cache: None = dropless (as generation, which is always dropless); a factor
    # = capacity dropping at that factor, as Switch / DeepSpeed evaluate (see docs/MOE.md)
    capacity_factor_eval: float | None = None
    bias_update_rate: float = 1e-3  # step of the per-expert selection bias for sigmoid_bias scoring
    expert_parallel_size: int = 1  # experts are split across this many ranks (set from the training config)
    min_capacity: int = 4  # lower bound of the per-expert capacity when not dropless (DeepSpeed's default)
    router_init_std: float = 0.02  # std of the router weight init (small: near-uniform routing at the start)
    expert_init_seed: int = 0  # expert g is initialised from seed + g, so ep=1 and ep=2 models match

    @property
    def aux_loss_weight(self) -> float:
        """aux_loss_coef, or by default 0.01 for softmax (Switch, Mixtral) and 1e-4 for sigmoid_bias, whose
        balance comes from the selection bias: DeepSeek-V3 keeps only a complementary balance loss of 1e-4."""
        if self.aux_loss_coef is not None:
            return self.aux_loss_coef
        return DEFAULT_AUX_LOSS_COEF[self.scoring]

    def validate(self, where: str = "moe") -> None:
        """Fail early with the key and the fix; `where` is the section's key (e.g. "model.middle.moe")."""
        if self.n_experts < 1:
            raise ValueError(f"{where}.n_experts={self.n_experts} must be >= 1")
        if self.top_k < 1:
            raise ValueError(f"{where}.top_k={self.top_k} must be between 1 and {where}.n_experts={self.n_experts}")
        if self.top_k > self.n_experts:
            raise ValueError(f"{where}.top_k={self.top_k} is larger than {where}.n_experts={self.n_experts}: "
                             f"{where}.top_k={self.top_k} must be between 1 and {where}.n_experts={self.n_experts}; "
                             "lower top_k or add experts")
        if self.d_ff < 0:
            raise ValueError(f"{where}.d_ff={self.d_ff} must be >= 0 (0 = width of the dense MLP)")
        if self.scoring not in MOE_SCORINGS:
            raise ValueError(f"{where}.scoring={self.scoring!r} is unknown: use one of {', '.join(MOE_SCORINGS)}")
        for key in ("aux_loss_coef", "z_loss_coef", "jitter", "bias_update_rate"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{where}.{key}={getattr(self, key)} must be >= 0")
        if self.jitter >= 1:
            raise ValueError(f"{where}.jitter={self.jitter} must be < 1 (inputs are scaled by U(1-jitter, 1+jitter))")
        factors = {"capacity_factor_train": self.capacity_factor_train,
                   "capacity_factor_eval": self.capacity_factor_eval}
        for key, value in factors.items():
            if value is not None and value <= 0:  # eval None = dropless (the loader rejects a null train factor)
                raise ValueError(f"{where}.{key}={value} must be > 0 (or set {where}.dropless=true)")
        if self.min_capacity < 0:
            raise ValueError(f"{where}.min_capacity={self.min_capacity} must be >= 0")
        if self.expert_parallel_size < 1 or self.n_experts % self.expert_parallel_size != 0:
            raise ValueError(f"{where}.expert_parallel_size={self.expert_parallel_size} must divide "
                             f"{where}.n_experts={self.n_experts}: pick a divisor of the number of experts")


@dataclass
class ModConfig:
    """Mixture-of-Depths (Raposo et al. 2024): routed blocks process only a fraction of the positions."""

    capacity: float = 0.0  # fraction of each row's valid positions a routed block processes (top-k); 0 = off
    every: int = 2  # layers 1-indexed k, 2k, ... are routed (2: routed and full blocks alternate, as in the paper)
    predictor_loss_coef: float = 0.01  # weight of the causal predictor's BCE loss (it sees a stop-gradient input)
    predictor_hidden: int = 0  # hidden width of the predictor MLP; 0 = d_model // 4
    # route training by the predictor too (causal training, as sampling is; capacity then is not enforced)
    predictor_in_training: bool = False

    def validate(self, where: str = "mod") -> None:
        """Fail early with the key and the fix; `where` is the section's key (e.g. "model.middle.mod")."""
        if not 0 <= self.capacity <= 1:
            raise ValueError(f"{where}.capacity={self.capacity} must be in (0, 1] (the fraction of positions a routed "
                             "block processes), or 0 to turn Mixture-of-Depths off")
        if self.every < 1:
            raise ValueError(f"{where}.every={self.every} must be >= 1 (1 = every layer routed, 2 = every second)")
        if self.predictor_loss_coef < 0:
            raise ValueError(f"{where}.predictor_loss_coef={self.predictor_loss_coef} must be >= 0")
        if self.predictor_hidden < 0:
            raise ValueError(f"{where}.predictor_hidden={self.predictor_hidden} must be >= 0 (0 = d_model // 4)")


@dataclass
class StackConfig:
    """One network of layers: an encoder, a decoder or the middle."""

    pattern: str = "A"  # layer letters, "A" = attention, "M" = Mamba; e.g. "MMMA"
    repeat: int = 1  # the pattern is repeated this many times (depth = len(pattern) * repeat)
    n_heads: int = 4  # attention heads
    head_dim: int = 0  # channels per attention head; 0 = d_model // n_heads
    mlp_ratio: float = 8 / 3  # SwiGLU hidden width / d_model (rounded up to a multiple of 8); 0 = no MLP
    mlp_on_mamba: bool = False  # give Mamba layers an MLP too (H-Net: no; Jamba: yes)
    pos_encoding: str = "rope"  # "rope" | "none" (NoPE)
    rope_base: float = 10000.0  # RoPE frequency base
    sliding_window: int = 0  # attention sees the last this-many positions (incl. itself); 0 = full causal
    qk_norm: bool = False  # RMSNorm on queries and keys per head (stabilises attention logits)
    mamba: MambaConfig = field(default_factory=MambaConfig)  # settings of the "M" layers
    moe_every: int = 0  # layers 1-indexed k, 2k, ... get an MoE feed-forward instead of the dense MLP; 0 = none
    moe_layers: list[int] = field(default_factory=list)  # explicit 0-indexed layers with an MoE feed-forward
    moe: MoEConfig = field(default_factory=MoEConfig)  # MoE settings for the chosen layers
    mod: ModConfig = field(default_factory=ModConfig)  # Mixture-of-Depths routing of attention blocks (off by default)

    def __post_init__(self) -> None:
        self.mamba = _as(MambaConfig, self.mamba)
        self.moe = _as(MoEConfig, self.moe)
        self.mod = _as(ModConfig, self.mod)
        self.moe_layers = list(self.moe_layers)

    @property
    def layers(self) -> str:
        return self.pattern * self.repeat

    def moe_layer_indices(self) -> list[int]:
        chosen = set(self.moe_layers)
        if self.moe_every > 0:
            chosen |= {i for i in range(len(self.layers)) if (i + 1) % self.moe_every == 0}
        return sorted(chosen)

    def mod_layer_indices(self) -> list[int]:
        """The 0-indexed layers routed by Mixture-of-Depths (none while mod.capacity is 0)."""
        if self.mod.capacity == 0:
            return []
        return [i for i in range(len(self.layers)) if (i + 1) % self.mod.every == 0]


@dataclass
class RouterConfig:
    kind: str = "cosine"  # "cosine" (H-Net) | "gate" (sigmoid of a learned score) | "stride" | "space"
    target_bytes_per_concept: float = 4.0  # target compression N of this stage (inputs per concept)
    ratio_loss_coef: float = 0.03  # alpha of the ratio loss (H-Net: 0.03); learned routers only
    stride: int = 4  # k of the "stride" router: a boundary every k units of a document
    smoothing: bool = True  # EMA smoothing of concept outputs by boundary confidence (H-Net Eq. 5)
    straight_through: bool = True  # multiply upsampled states by STE(confidence) so the router gets gradient
    prob_clamp: float = 1e-4  # confidences are clamped to [eps, 1 - eps] inside the EMA (finite gradients)
    # learned routers: for this many optimizer steps a fixed stride (every round(N) units) hands over to the
    # learned router: p = w * stride + (1 - w) * p_learned, w = 1 - step / warmup_steps (0 = off). Keeps the
    # compression steady while the encoder's first steps swing the learned router's (docs/MODEL.md)
    warmup_steps: int = 0


@dataclass
class StageConfig:
    """One level of the hierarchy: encoder -> router -> (inner) -> decoder, at width d_model."""

    d_model: int = 128  # width of this stage
    encoder: StackConfig = field(default_factory=lambda: StackConfig(pattern="MM"))
    decoder: StackConfig = field(default_factory=lambda: StackConfig(pattern="MM"))
    router: RouterConfig = field(default_factory=RouterConfig)
    # run the encoder in float32 under bf16 autocast, so that the boundary decisions equal the float32 model's
    # (a bf16 encoder flips ~0.1-0.15% of them); costs the encoder's share of FLOPs (11-23%) at float32 speed
    encoder_fp32: bool = False
    lr_mult: float = 0.0  # learning-rate multiplier of this stage's parameters; 0 = H-Net Eq. 11 rule

    def __post_init__(self) -> None:
        self.encoder = _as(StackConfig, self.encoder)
        self.decoder = _as(StackConfig, self.decoder)
        self.router = _as(RouterConfig, self.router)


@dataclass
class ModelConfig:
    vocab_size: int = VOCAB_SIZE  # 256 bytes + EOD + PAD (data_pipeline/vocab.py)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])  # outermost first; [] = byte model
    d_middle: int = 256  # width of the middle network
    middle: StackConfig = field(default_factory=lambda: StackConfig(pattern="A", repeat=4, pos_encoding="none"))
    middle_lr_mult: float = 0.0  # learning-rate multiplier of the middle; 0 = H-Net Eq. 11 rule (1.0 without stages)
    width_change: str = "pad"  # "pad": shared learned vector going up, first dims going down (H-Net) | "linear"
    tie_embeddings: bool = False  # byte head shares the input embedding matrix
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of linear/embedding weights at init (output projections scaled by depth)
    # packed documents never see each other: a document starts at its EOD; attention is block-diagonal, Mamba,
    # smoothing and routing restart at each document start (docs/MODEL.md); False = documents run together
    document_isolation: bool = True

    def __post_init__(self) -> None:
        # YAML gives plain dicts for nested sections: turn them into dataclasses.
        if not isinstance(self.stages, (list, tuple)):
            raise ValueError(f"model.stages must be a list of stage sections (outermost first), "
                             f"got {type(self.stages).__name__}; use [] for a plain byte model")
        self.stages = [_as(StageConfig, s) for s in self.stages]
        self.middle = _as(StackConfig, self.middle)
        self.validate()

    # ------------------------------------------------------------------ helpers
    def widths(self) -> list[int]:
        """Widths outermost first, ending with the middle."""
        return [s.d_model for s in self.stages] + [self.d_middle]

    @property
    def d_embed(self) -> int:
        return self.widths()[0]

    def lr_multipliers(self) -> list[float]:
        """Per stage then middle. Explicit values win; 0 uses H-Net Eq. 11:
        lambda_s = sqrt(N_GPT * prod_{i>=s} N_i / prod_i N_i * D_S / D_s), with N_S = 1."""
        if not self.stages:
            return [self.middle_lr_mult or 1.0]
        ratios = [s.router.target_bytes_per_concept for s in self.stages] + [1.0]
        widths = self.widths()
        total = math.prod(ratios)
        rule = [
            math.sqrt(N_GPT_BYTES_PER_TOKEN * math.prod(ratios[s:]) / total * widths[-1] / widths[s])
            for s in range(len(widths))
        ]
        explicit = [s.lr_mult for s in self.stages] + [self.middle_lr_mult]
        return [e if e > 0 else r for e, r in zip(explicit, rule)]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.vocab_size < VOCAB_SIZE:
            raise ValueError(f"model.vocab_size={self.vocab_size} is too small: bytes + EOD + PAD need {VOCAB_SIZE}")
        _check_choice("model.width_change", self.width_change, WIDTH_CHANGES)
        if not isinstance(self.document_isolation, bool):
            raise ValueError(f"model.document_isolation={self.document_isolation!r} must be true or false")
        _check_positive("model.d_middle", self.d_middle)
        _check_positive("model.norm_eps", self.norm_eps)
        _check_positive("model.init_std", self.init_std)
        _check_non_negative("model.middle_lr_mult", self.middle_lr_mult)
        for i, stage in enumerate(self.stages):
            key = f"model.stages[{i}]"
            _check_positive(f"{key}.d_model", stage.d_model)
            _check_non_negative(f"{key}.lr_mult", stage.lr_mult)
            _validate_stack(f"{key}.encoder", stage.encoder, stage.d_model)
            _validate_stack(f"{key}.decoder", stage.decoder, stage.d_model)
            _validate_router(f"{key}.router", stage.router, is_byte_level=(i == 0))
        _validate_stack("model.middle", self.middle, self.d_middle)
        widths = self.widths()
        if self.width_change == "pad":
            for i in range(len(widths) - 1):
                if widths[i + 1] < widths[i]:
                    inner = f"model.stages[{i + 1}].d_model" if i + 1 < len(self.stages) else "model.d_middle"
                    raise ValueError(
                        f"{inner}={widths[i + 1]} is narrower than model.stages[{i}].d_model={widths[i]}: "
                        "width_change='pad' needs widths that never shrink inwards; widen it or set "
                        "model.width_change='linear'"
                    )


def _as(cls, value):
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = set(cls.__dataclass_fields__)
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**value)  # nested sections are converted by each class's __post_init__
    raise ValueError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {list(choices)}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{key}={value} must be > 0")


def _check_non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{key}={value} must be >= 0")


def _validate_stack(key: str, stack: StackConfig, d_model: int) -> None:
    if not isinstance(stack.pattern, str) or not stack.pattern:
        raise ValueError(f"{key}.pattern must be a non-empty string of layer letters {sorted(LAYER_LETTERS)}")
    bad = sorted(set(stack.pattern) - set(LAYER_LETTERS))
    if bad:
        raise ValueError(
            f"{key}.pattern={stack.pattern!r} has unknown layer letter(s) {bad}; "
            f"use " + ", ".join(f"{k!r} ({v})" for k, v in LAYER_LETTERS.items())
        )
    _check_positive(f"{key}.repeat", stack.repeat)
    _check_choice(f"{key}.pos_encoding", stack.pos_encoding, POS_ENCODINGS)
    _check_non_negative(f"{key}.mlp_ratio", stack.mlp_ratio)
    _check_non_negative(f"{key}.sliding_window", stack.sliding_window)
    _check_positive(f"{key}.rope_base", stack.rope_base)
    if "A" in stack.pattern:
        _check_positive(f"{key}.n_heads", stack.n_heads)
        if stack.head_dim == 0 and d_model % stack.n_heads != 0:
            raise ValueError(
                f"{key}.n_heads={stack.n_heads} does not divide the width {d_model}; "
                f"change n_heads or set {key}.head_dim"
            )
        head_dim = stack.head_dim or d_model // stack.n_heads
        if stack.pos_encoding == "rope" and head_dim % 2:
            raise ValueError(f"{key}: RoPE needs an even head dim, got {head_dim}; change n_heads/head_dim")
    if "M" in stack.pattern:
        m = stack.mamba
        _check_positive(f"{key}.mamba.d_state", m.d_state)
        _check_positive(f"{key}.mamba.d_conv", m.d_conv)
        _check_positive(f"{key}.mamba.chunk_size", m.chunk_size)
        _check_positive(f"{key}.mamba.head_dim", m.head_dim)
        _check_choice(f"{key}.mamba.kernel", m.kernel, ("auto", "torch"))
        d_inner = int(m.expand * d_model)
        if d_inner <= 0 or d_inner % m.head_dim:
            raise ValueError(
                f"{key}.mamba: inner width expand*d_model={d_inner} must be a positive multiple of "
                f"{key}.mamba.head_dim={m.head_dim}"
            )
        if not 0 < m.dt_min <= m.dt_max:
            raise ValueError(f"{key}.mamba: need 0 < dt_min <= dt_max, got {m.dt_min}, {m.dt_max}")
    _check_non_negative(f"{key}.moe_every", stack.moe_every)
    depth = len(stack.layers)
    for i in stack.moe_layers:
        if not 0 <= i < depth:
            raise ValueError(f"{key}.moe_layers has {i}, outside the {depth} layers of {key}")
    if stack.moe_layer_indices():
        stack.moe.validate(f"{key}.moe")
        if stack.mlp_ratio == 0 and stack.moe.d_ff == 0:
            raise ValueError(f"{key}.moe.d_ff=0 means 'same as the dense MLP' but {key}.mlp_ratio=0; set moe.d_ff")
    stack.mod.validate(f"{key}.mod")
    for i in stack.mod_layer_indices():
        if stack.layers[i] != "A":
            raise ValueError(f"{key}.mod routes layer {i}, a Mamba ('M') layer: Mixture-of-Depths routes attention "
                             f"layers only; change {key}.mod.every or {key}.pattern so that only 'A' layers are routed")


def _validate_router(key: str, router: RouterConfig, is_byte_level: bool) -> None:
    _check_choice(f"{key}.kind", router.kind, ROUTER_KINDS)
    if not router.target_bytes_per_concept >= 1:
        raise ValueError(
            f"{key}.target_bytes_per_concept={router.target_bytes_per_concept} must be >= 1 (N < 1 would mean "
            "more concepts than inputs)"
        )
    if router.kind in LEARNED_ROUTER_KINDS and router.target_bytes_per_concept <= 1:
        raise ValueError(
            f"{key}.target_bytes_per_concept must be > 1 for a learned router (the ratio loss divides by N-1)"
        )
    _check_non_negative(f"{key}.ratio_loss_coef", router.ratio_loss_coef)
    if router.kind == "stride":
        _check_positive(f"{key}.stride", router.stride)
    if router.kind == "space" and not is_byte_level:
        raise ValueError(f"{key}.kind='space' only works on bytes (stage 0); use cosine/gate/stride for inner stages")
    if not 0 < router.prob_clamp < 0.5:
        raise ValueError(f"{key}.prob_clamp={router.prob_clamp} must be in (0, 0.5)")
    if not isinstance(router.warmup_steps, int) or router.warmup_steps < 0:
        raise ValueError(f"{key}.warmup_steps={router.warmup_steps!r} must be a whole number of steps >= 0 "
                         "(0 = no router warm-up)")


def mlp_hidden(d_model: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: ratio * d rounded up to a multiple of 8 (fast matmul shapes)."""
    return 8 * math.ceil(mlp_ratio * d_model / 8)
