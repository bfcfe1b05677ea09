"""SynergyLM: a byte-level language model with a learned chunking hierarchy.

    bytes -> embedding -> Stage 0 -> byte head
    Stage s:  encoder -> router -> downsample -> widen -> (Stage s+1 | middle) -> narrow
              -> smooth (EMA) -> upsample (causal repeat, STE) -> + Linear(encoder out) -> decoder

The same forward() serves training (no cache) and generation (a cache: each call processes the
next bytes after those already cached, and an inner stage runs only on concepts the router opens).

Document isolation (ModelConfig.document_isolation): a document starts at each EOD (the EOD is its first
byte); every layer of every stage gets the document index of its units (`seq_idx`) and never reads across
a document start, and the router opens a concept at every EOD, so no concept spans two documents.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from data_pipeline.vocab import EOD_ID, IGNORE_INDEX, N_BYTES, PAD_ID
from synergy_dist.model.chunking import (
    BoundaryRouter,
    RouterState,
    downsample,
    gather_units,
    last_valid,
    smooth,
    upsample,
)
from synergy_dist.model.config import ModelConfig, StageConfig
from synergy_dist.model.layers import AttentionCache, RMSNorm
from synergy_dist.model.moe.layer import MoEFeedForward, dropless_routing
from synergy_dist.model.precision import Float32Linear, compute_dtype
from synergy_dist.model.stack import Float32Stack, LayerStats, Stack
from synergy_dist.model.statistics import ModelStatistics, StageStatistics


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # CE + weighted ratio, MoE and MoD predictor losses (None without labels)
    logits: torch.Tensor  # (B, L, vocab)
    stats: ModelStatistics  # detached losses and routing statistics


@dataclass
class StageCache:
    encoder: list
    decoder: list
    router: RouterState = field(default_factory=RouterState)
    inner: StageCache | list | None = None
    last_concept: torch.Tensor | None = None  # (B, D) smoothed output of the concept in force
    doc: torch.Tensor | None = None  # (B,) document index of the last unit (and of last_concept), with isolation


@dataclass
class StageRouting:
    """What one stage's router did in one forward call."""

    units: torch.Tensor  # valid inputs of this stage
    concepts: torch.Tensor  # concepts it produced
    boundary_rate: torch.Tensor
    ratio_loss: torch.Tensor  # unweighted, differentiable
    ratio_loss_coef: float  # 0 for fixed routers (nothing to train)


class WidthChange(nn.Module):
    """Between a stage of width d_outer and its inner network of width d_inner (H-Net 'pad' or a projection)."""

    def __init__(self, d_outer: int, d_inner: int, how: str):
        super().__init__()
        self.d_outer, self.d_inner, self.how = d_outer, d_inner, how
        if how == "pad" and d_inner > d_outer:
            self.pad = nn.Parameter(torch.zeros(d_inner - d_outer))  # shared learned vector appended going up
        elif how == "linear" and d_inner != d_outer:
            self.up = nn.Linear(d_outer, d_inner, bias=False)
            self.down = nn.Linear(d_inner, d_outer, bias=False)

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pad"):
            return torch.cat((x, self.pad.to(x.dtype).expand(*x.shape[:-1], -1)), dim=-1)
        return self.up(x) if hasattr(self, "up") else x

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "down"):
            return self.down(x)
        return x[..., : self.d_outer]


class HierarchyStage(nn.Module):
    def __init__(self, cfg: ModelConfig, level: int):
        super().__init__()
        stage: StageConfig = cfg.stages[level]
        d, eps = stage.d_model, cfg.norm_eps
        self.cfg = stage
        self.level = level
        self.encoder = (Float32Stack(d, stage.encoder, eps, role=f"stage {level} float32 encoder")
                        if stage.encoder_fp32 else Stack(d, stage.encoder, eps))
        self.router = BoundaryRouter(d, stage.router, cfg.vocab_size)
        d_inner = cfg.widths()[level + 1]
        self.width = WidthChange(d, d_inner, cfg.width_change)
        last = level + 1 == len(cfg.stages)
        self.inner: nn.Module = Stack(d_inner, cfg.middle, eps) if last else HierarchyStage(cfg, level + 1)
        # encoder -> decoder skip, zero at init (H-Net Eq. 3); float32 like H-Net's (model/precision.py)
        self.residual = Float32Linear(d, d, bias=False, role=f"stage {level} residual projection")
        nn.init.zeros_(self.residual.weight)
        self.residual.keep_init = True
        self.decoder = Stack(d, stage.decoder, eps)

    def new_cache(self) -> StageCache:
        return StageCache(self.encoder.new_cache(), self.decoder.new_cache(), inner=self.inner.new_cache())

    def forward(self, x, ids, force, valid, cache: StageCache | None = None, seq_idx: torch.Tensor | None = None):
        """x (B, T, D); ids (B, T) bytes at stage 0 else None; force/valid (B, T) bool; seq_idx (B, T)
        nondecreasing document index or None (no isolation); every document start must be in `force`.
        Returns (y, [StageRouting per stage, outermost first], LayerStats keyed by layer name).
        The record_function labels let benchmarks measure the routing share of a step."""
        hidden, layers = self.encoder(x, valid, cache and cache.encoder, seq_idx)
        layers = layers.named(f"stage{self.level}.encoder.")
        with record_function(f"synergy/stage{self.level}/route_down"):
            route = self.router(hidden, ids, force, valid, cache and cache.router)
            hidden = hidden.to(x.dtype)  # a float32 encoder's output goes on in the stream's dtype
            # Training always runs the inner network (>= 1 slot, maybe all padding) so every rank enters the
            # MoE collectives equally often; generation skips it when no concept opened.
            chunks = downsample(hidden, route.boundary, min_len=1 if cache is None else 0)
        routings = [StageRouting(valid.sum(), route.boundary.sum(), route.boundary_rate, route.ratio_loss,
                                 self.cfg.router.ratio_loss_coef if self.router.learned else 0.0)]

        # document of each concept; padding slots (after the last concept) join the last document
        concept_doc = None if seq_idx is None else gather_units(seq_idx, chunks.positions).cummax(dim=1).values
        if chunks.x.shape[1] > 0:
            inner_force = gather_units(force, chunks.positions) & chunks.valid
            # generation: only the rows that opened a concept run the inner network, on their own caches
            rows = None
            if cache is not None and cache.last_concept is not None and not bool(chunks.valid[:, 0].all()):
                rows = chunks.valid[:, 0].nonzero().squeeze(1)
            inner_y, inner_routings, inner_layers = self._inner(
                self.width.widen(chunks.x), inner_force, chunks.valid, cache and cache.inner, concept_doc, rows)
            routings += inner_routings
            layers.update(inner_layers)
            concepts = self.width.narrow(inner_y)
        else:
            concepts = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[-1])

        with record_function(f"synergy/stage{self.level}/smooth_up"):
            previous = cache.last_concept if cache is not None else None
            if concepts.shape[1] > 0 and self.router.learned and self.cfg.router.smoothing:
                confidence = gather_units(route.prob, chunks.positions)
                carried = previous
                if previous is not None and concept_doc is not None and cache.doc is not None:
                    # a document that starts with this call's first concept does not continue the previous EMA
                    carried = previous * (concept_doc[:, 0] == cache.doc).to(previous.dtype)[:, None]
                concepts = smooth(concepts, confidence, carried, self.cfg.router.prob_clamp, concept_doc)
            # every document start is a boundary, so a byte never takes a concept of another document
            up = upsample(concepts, route.boundary, route.prob, previous, self.cfg.router.straight_through)
            if cache is not None and concepts.shape[1] > 0:  # a row without a new concept keeps its own
                cache.last_concept = last_valid(concepts, chunks.valid, cache.last_concept)
            if cache is not None:
                cache.doc = None if seq_idx is None else seq_idx[:, -1]
        # summed in float32 (float64 in fp64 runs), as H-Net does, then back to the stream's dtype
        mixed = (up.to(compute_dtype(up.dtype)) + self.residual(hidden)).to(hidden.dtype)
        y, dec_layers = self.decoder(mixed, valid, cache and cache.decoder, seq_idx)
        layers.update(dec_layers.named(f"stage{self.level}.decoder."))
        return y, routings, layers


    def _inner(self, x, force, valid, cache, doc, rows: torch.Tensor | None):
        """The inner network (stage or middle) on the concepts, or only on `rows` of them (the others' outputs are
        zeros: padding). Returns (y, [StageRouting per inner stage], LayerStats keyed by layer name)."""
        if rows is not None:
            part = take_rows(cache, rows)
            y, routings, layers = self._inner(x[rows], force[rows], valid[rows], part,
                                              None if doc is None else doc[rows], None)
            put_rows(cache, rows, part)
            return x.new_zeros(x.shape[0], *y.shape[1:]).index_put((rows,), y), routings, layers
        if isinstance(self.inner, HierarchyStage):
            return self.inner(x, None, force, valid, cache, doc)
        y, layers = self.inner(x, valid, cache, doc)
        return y, [], layers.named("middle.")


def take_rows(cache, rows: torch.Tensor):
    """The part of a generation cache (caches, lists of them, tensors with the batch first) that holds `rows`."""
    if isinstance(cache, list):
        return [take_rows(c, rows) for c in cache]
    if isinstance(cache, torch.Tensor):
        return cache[rows]
    if isinstance(cache, AttentionCache):  # its own layout: slots per row
        return cache.take(rows)
    if dataclasses.is_dataclass(cache):
        return type(cache)(**{f.name: take_rows(getattr(cache, f.name), rows) for f in dataclasses.fields(cache)})
    return cache  # None, numbers


def put_rows(cache, rows: torch.Tensor, part) -> None:
    """Write `part` (from take_rows, after a call on those rows alone) back into the cache's rows."""
    if isinstance(cache, list):
        for c, p in zip(cache, part):
            put_rows(c, rows, p)
    elif isinstance(cache, AttentionCache):
        cache.put(rows, part)
    elif dataclasses.is_dataclass(cache):
        for f in dataclasses.fields(cache):
            old, new = getattr(cache, f.name), getattr(part, f.name)
            if isinstance(new, torch.Tensor):
                setattr(cache, f.name, old.index_put((rows,), new))
            elif isinstance(new, list) or dataclasses.is_dataclass(new):
                put_rows(old, rows, new)


class SynergyLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"SynergyLM needs a ModelConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_embed
        self.embed = nn.Embedding(cfg.vocab_size, d)
        if cfg.stages:
            self.body: nn.Module = HierarchyStage(cfg, 0)
        else:  # plain byte-level model: the middle runs on bytes
            self.body = Stack(d, cfg.middle, cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        n_layers = sum(len(s.encoder.layers) + len(s.decoder.layers) for s in self.cfg.stages)
        n_layers += len(self.cfg.middle.layers)
        moe_modules = [m for m in self.modules() if isinstance(m, MoEFeedForward)]
        owned_by_moe = {id(p) for m in moe_modules for p in m.parameters()}  # the MoE layer initialises itself
        for module in self.modules():
            if isinstance(module, nn.Linear) and not getattr(module, "keep_init", False):
                if id(module.weight) in owned_by_moe:
                    continue
                out_std = std / math.sqrt(2 * n_layers) if getattr(module, "is_residual_out", False) else std
                nn.init.normal_(module.weight, std=out_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, L) in [0, vocab); labels (B, L) aligned with the inputs (labels[:, t] is the
        byte that follows input_ids[:, t]), IGNORE_INDEX (-100) skipped.

        loss = CE + each learned router's ratio_loss_coef x ratio loss + each MoE layer's weighted losses
        + each Mixture-of-Depths block's weighted predictor loss.
        """
        self._check_ids(input_ids, "input_ids")
        logits, routings, layers = self._run(input_ids, cache=None)
        stats = self._statistics(routings, layers)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            # trained on every counted label, EOD included (generation learns to stop); bits per byte counts
            # the byte targets only (docs/EVALUATION.md). No counted label gives 0 instead of NaN.
            nats = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none")
            is_byte = (labels.flatten() >= 0) & (labels.flatten() < N_BYTES)
            ce = nats.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)
            stats.ce_loss = ce.detach()
            stats.byte_nats, stats.n_bytes = nats.detach()[is_byte].double().sum(), is_byte.sum()
            loss = ce + sum((r.ratio_loss_coef * r.ratio_loss for r in routings), ce.new_zeros(()))
            loss = loss + sum((layer.loss for layer in layers.moe.values()), ce.new_zeros(()))
            loss = loss + sum((layer.loss for layer in layers.mod.values()), ce.new_zeros(()))
        return ModelOutput(loss=loss, logits=logits, stats=stats)

    def _run(self, input_ids: torch.Tensor, cache):
        """Shared by forward (cache None) and generation. Returns (logits, stage routings, LayerStats).

        With a cache, rows may hold PAD_ID (padding, left or right, e.g. left-padded prompts of different lengths,
        or rows that stopped): padding enters no cache or state, and each row continues exactly as if it ran alone.
        The logits at padding are meaningless. The first call on a new cache must give every row a real byte
        (generation starts each row with EOD)."""
        if cache is not None:
            order = real_first(input_ids != PAD_ID)
            if order is not None:  # inside the model, padding only ever follows a row's real bytes
                logits, routings, layers = self._run_embedded(self.embed(input_ids.gather(1, order)),
                                                              input_ids.gather(1, order), cache)
                back = torch.empty_like(logits).scatter_(1, order[..., None].expand_as(logits), logits)
                return back, routings, layers
        x = self.embed(input_ids)
        return self._run_embedded(x, input_ids, cache)

    def _run_embedded(self, x: torch.Tensor, input_ids: torch.Tensor, cache):
        """_run from the embedded inputs x (B, L, D) (tests take gradients with respect to them)."""
        valid = input_ids != PAD_ID
        seq_idx = self._document_index(input_ids, cache) if self.cfg.document_isolation else None
        with dropless_routing(self, enabled=cache is not None):  # cached generation == full recomputation
            if isinstance(self.body, HierarchyStage):
                force = self._document_starts(input_ids, cache, self.cfg.document_isolation)
                y, routings, layers = self.body(x, input_ids, force, valid, cache and cache["body"], seq_idx)
            else:
                y, layers = self.body(x, valid, cache and cache["body"], seq_idx)
                routings, layers = [], layers.named("middle.")
        if cache is not None:
            cache["last_id"] = last_valid(input_ids, valid, cache["last_id"])
        return self.head(y), routings, layers

    @staticmethod
    def _document_starts(input_ids: torch.Tensor, cache, at_eod: bool) -> torch.Tensor:
        """The first byte of the sequence and every byte right after EOD must open a concept; with document
        isolation every EOD too (it is the first byte of the document it opens)."""
        if cache is None or cache.get("last_id") is None:
            first = torch.ones_like(input_ids[:, :1], dtype=torch.bool)
        else:
            first = cache["last_id"][:, None] == EOD_ID
        force = torch.cat((first, input_ids[:, :-1] == EOD_ID), dim=1)
        return force | (input_ids == EOD_ID) if at_eod else force

    @staticmethod
    def _document_index(input_ids: torch.Tensor, cache) -> torch.Tensor | None:
        """(B, L) index of each byte's document, counting EODs (a document starts at its EOD), continued across
        cached calls. None without a cache when every row holds one document: nothing to keep apart, and the
        layers keep their plain causal kernels."""
        doc = (input_ids == EOD_ID).long().cumsum(dim=1)
        if cache is None:
            return doc if bool((doc[:, -1] != doc[:, 0]).any()) else None
        if cache.get("doc") is not None:
            doc = doc + cache["doc"][:, None]
        cache["doc"] = doc[:, -1]
        return doc

    @staticmethod
    def _statistics(routings: list[StageRouting], layers: LayerStats) -> ModelStatistics:
        stages = []
        bytes_total = routings[0].units.float() if routings else None
        for r in routings:
            concepts = r.concepts.float().clamp(min=1)
            stages.append(StageStatistics(
                units=r.units.float(), concepts=r.concepts.float(), boundary_rate=r.boundary_rate.float(),
                compression=(r.units.float() / concepts).detach(),  # inputs per concept, this stage
                bytes_per_concept=(bytes_total / concepts).detach(),  # bytes per concept, cumulative
                ratio_loss=r.ratio_loss.detach().float(),
            ))
        return ModelStatistics(stages, {name: layer.detach() for name, layer in layers.moe.items()},
                               mod={name: layer.detach() for name, layer in layers.mod.items()})

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"{name} must be a (batch, length) LongTensor, got {tuple(ids.shape)} {ids.dtype}")
        if bool(((ids < 0) | (ids >= self.cfg.vocab_size)).any()):
            raise ValueError(f"{name} has ids outside [0, {self.cfg.vocab_size})")

    # ------------------------------------------------------------------ generation
    def new_cache(self) -> dict:
        return {"body": self.body.new_cache(), "last_id": None, "doc": None}

    @torch.no_grad()
    def generate_iter(
        self,
        prompt: bytes,
        max_new_bytes: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[bytes]:
        """Yield generated bytes one at a time. The model reads EOD + prompt (a document start);
        generation stops early when it predicts EOD. temperature <= 0 means greedy."""
        if not isinstance(prompt, (bytes, bytearray)):
            raise ValueError(f"prompt must be bytes, got {type(prompt).__name__}; encode text with .encode('utf-8')")
        for pieces in self.generate_batch_iter([prompt], max_new_bytes, temperature, top_k, top_p, seed):
            yield pieces[0]

    @torch.no_grad()
    def generate_batch_iter(
        self,
        prompts: list[bytes],
        max_new_bytes: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | list[int | None] | None = None,
    ) -> Iterator[list[bytes]]:
        """Generate for several prompts at once: at each step yield one byte per row (b"" for a row that has
        stopped) until every row has stopped or max_new_bytes steps are done. Row i equals generate_iter(prompts[i],
        seed=seeds[i]) byte for byte: every row has its own caches, router boundaries and sampler (a
        torch.Generator seeded with `seed`, the same for every row, or seed[i] from a list). Prompts are
        left-padded to one prefill call; a row that predicted EOD is fed padding, which changes none of its state."""
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, (bytes, bytearray)):
                raise ValueError(f"prompts[{i}] must be bytes, got {type(prompt).__name__}; "
                                 f"encode text with .encode('utf-8')")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        if max_new_bytes < 0:
            raise ValueError(f"max_new_bytes={max_new_bytes} must be >= 0")
        if not prompts:
            return
        device = self.embed.weight.device
        generators = [torch.Generator(device=device) for _ in prompts]
        for generator, row_seed in zip(generators, seeds):
            if row_seed is not None:
                generator.manual_seed(row_seed)
        was_training = self.training
        self.eval()  # no dropout-like randomness, no MoE balancing updates or training collectives
        try:
            cache = self.new_cache()
            width = 1 + max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long, device=device)
            for i, prompt in enumerate(prompts):  # left padding: every row's last prompt byte is in the last column
                ids[i, width - 1 - len(prompt):] = torch.tensor([EOD_ID, *prompt], dtype=torch.long)
            logits, _, _ = self._run(ids, cache)  # prefill: every prompt in one parallel call
            running = [True] * len(prompts)
            for step in range(max_new_bytes):
                next_ids = sample_rows(logits[:, -1], running, temperature, top_k, top_p, generators)
                running = [r and n < N_BYTES for r, n in zip(running, next_ids)]
                if not any(running):
                    return
                yield [bytes([n]) if r else b"" for r, n in zip(running, next_ids)]
                if step + 1 < max_new_bytes:
                    fed = [n if r else PAD_ID for r, n in zip(running, next_ids)]
                    logits, _, _ = self._run(torch.tensor(fed, device=device)[:, None], cache)
        finally:
            self.train(was_training)

    def generate(self, prompt: bytes | list[bytes], max_new_bytes: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | list[int | None] | None = None) -> bytes | list[bytes]:
        """The continuation of one prompt (bytes), or of each prompt of a list (a list of bytes, batched)."""
        if isinstance(prompt, (list, tuple)):
            produced = [bytearray() for _ in prompt]
            for pieces in self.generate_batch_iter(prompt, max_new_bytes, temperature, top_k, top_p, seed):
                for out, piece in zip(produced, pieces):
                    out += piece
            return [bytes(out) for out in produced]
        return b"".join(self.generate_iter(prompt, max_new_bytes, temperature, top_k, top_p, seed))

    # ------------------------------------------------------------------ optimizer groups
    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the dense blocks of every stack during backward (less memory, ~1/3 more compute)."""
        for module in self.modules():
            if isinstance(module, Stack):
                module.checkpoint_activations = enabled

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups keyed by (part, decay, experts). Each group has "params", "name",
        "weight_decay", "lr_mult" (H-Net LR modulation: stage s or the middle) and "experts": True for MoE
        expert parameters (allreduce=False). Pass the list through synergy_dist.model.moe.layer.moe_param_groups
        to get DeepSpeed's expert-parallel groups. No decay for norms, biases, embeddings, boundary routers
        and SSM dynamics parameters (A_log, dt_bias, D)."""
        multipliers = self.cfg.lr_multipliers()
        part_of = self._parameter_parts()
        no_decay_ids = self._no_decay_ids()
        groups: dict[tuple, dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = part_of[id(p)]
            decay = id(p) not in no_decay_ids
            expert = is_expert_param(name, p)
            key = (part, decay, expert)
            if key not in groups:
                level = len(multipliers) - 1 if part == "middle" else int(part[len("stage"):])
                groups[key] = {
                    "params": [],
                    "name": f"{part}/{'decay' if decay else 'no_decay'}{'/experts' if expert else ''}",
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr_mult": multipliers[level], "experts": expert,
                }
            groups[key]["params"].append(p)
        return list(groups.values())

    def _parameter_parts(self) -> dict[int, str]:
        parts: dict[int, str] = {}
        outer = "stage0" if self.cfg.stages else "middle"
        for p in list(self.embed.parameters()) + list(self.head.parameters()):
            parts[id(p)] = outer
        node, level = self.body, 0
        while isinstance(node, HierarchyStage):
            for child_name, child in node.named_children():
                if child_name != "inner":
                    for p in child.parameters():
                        parts[id(p)] = f"stage{level}"
            node, level = node.inner, level + 1
        for p in node.parameters():
            parts[id(p)] = "middle"
        return parts

    def _no_decay_ids(self) -> set[int]:
        ids = {id(p) for p in self.embed.parameters()}
        for module in self.modules():
            if isinstance(module, (RMSNorm, BoundaryRouter)):
                ids |= {id(p) for p in module.parameters()}
        for p in self.parameters():
            if p.ndim < 2 or getattr(p, "no_weight_decay", False):
                ids.add(id(p))
        if self.cfg.tie_embeddings:
            ids.add(id(self.head.weight))
        return ids


def is_expert_param(name: str, p: torch.Tensor) -> bool:
    """DeepSpeed marks expert parameters with allreduce=False; fall back on the module name."""
    return getattr(p, "allreduce", True) is False or ".experts." in name or ".experts_" in name


def real_first(valid: torch.Tensor) -> torch.Tensor | None:
    """(B, L) permutation of each row putting its real positions first, in order; None when they already are."""
    if not bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        return None
    return torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices


def sample_rows(logits: torch.Tensor, running: list[bool], temperature: float, top_k: int | None,
                top_p: float | None, generators: list[torch.Generator]) -> list[int]:
    """The next id of each row of (B, vocab) logits, as sample_next picks it with that row's generator (a stopped
    row draws nothing, so every row consumes random numbers exactly as it would alone); -1 for stopped rows."""
    if temperature <= 0:  # greedy: one argmax for the batch, the same as sample_next's
        greedy = logits.float().clone()
        greedy[:, PAD_ID:] = float("-inf")
        return [int(n) if r else -1 for r, n in zip(running, greedy.argmax(dim=-1).tolist())]
    return [sample_next(row, temperature, top_k, top_p, g) if r else -1
            for row, r, g in zip(logits, running, generators)]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> int:
    """Pick the next id from (vocab,) logits; PAD is never produced."""
    logits = logits.float().clone()
    logits[PAD_ID:] = float("-inf")
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
