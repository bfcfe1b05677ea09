"""Evaluation of a SynergyLM on shard sets: bits per byte, realised compression, boundary and MoE statistics.

    from synergy_dist.evaluate import evaluate
    result = evaluate(model, {"pydocs-valid": "shards/valid"}, seq_len=512, batch_size=8)
    result["overall"]["bpb"], result["sources"]["pydocs-valid"]["bytes_per_concept"]

Deterministic and exhaustive: each source is read in stream order (no shuffling) as
EOD doc_1 EOD doc_2 EOD ... and cut into windows of seq_len + 1 ids that overlap by one id, so every
document byte is predicted exactly once (the first byte of a window's targets continues the previous
window). Bits per byte = the summed cross entropy of the document bytes / their number / ln 2; the
predictions of EOD are not counted (they are not bytes of the data). The last window of a source is
padded with PAD (ignored by the model and the loss). Windows never mix sources. This is the one definition
of bits per byte (docs/EVALUATION.md); the trainer's validation runs the same windows through
`evaluate_share`, split across ranks.

Boundary statistics come from forward hooks on the routers (the same outputs the model routes with):
per stage the units (valid inputs), concepts (boundaries), boundary rate, compression, bytes per
concept (cumulative), mean boundary probability, a 10-bin histogram of p and concept lengths.
MoE statistics add up each layer's tokens per expert over the whole set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.shards import iter_shard_documents
from data_pipeline.vocab import EOD_ID, IGNORE_INDEX, N_BYTES, PAD_ID
from synergy_dist.model.chunking import RoutingOutput
from synergy_dist.model.statistics import bits_per_byte
from synergy_dist.model.synergy import HierarchyStage

PROB_BINS = 10  # histogram bins of the boundary probability over [0, 1]


# ---------------------------------------------------------------------- windows
def windows(documents: Iterable[bytes], seq_len: int) -> Iterator[np.ndarray]:
    """Windows of seq_len + 1 ids over EOD doc EOD doc ... EOD, consecutive windows sharing one id;
    the last one padded with PAD. Every id after the leading EOD is a target exactly once."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    span = seq_len + 1
    buffer = np.array([EOD_ID], dtype=np.int64)
    for doc in documents:
        ids = np.frombuffer(doc, dtype=np.uint8).astype(np.int64)
        buffer = np.concatenate((buffer, ids, [EOD_ID]))
        start = 0
        while len(buffer) - start >= span:
            yield buffer[start:start + span]
            start += seq_len
        buffer = buffer[start:]
    if len(buffer) > 1:  # a tail with at least one target left
        yield np.concatenate((buffer, np.full(span - len(buffer), PAD_ID, dtype=np.int64)))


def window_batches(documents: Iterable[bytes], seq_len: int, batch_size: int) -> Iterator[list[np.ndarray]]:
    """`windows` in order, in lists of batch_size (the last one shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rows: list[np.ndarray] = []
    for window in windows(documents, seq_len):
        rows.append(window)
        if len(rows) == batch_size:
            yield rows
            rows = []
    if rows:
        yield rows


def window_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of a list of windows; labels count document bytes only."""
    ids = torch.from_numpy(np.stack(rows))
    inputs, targets = ids[:, :-1].clone(), ids[:, 1:].clone()
    targets[targets >= N_BYTES] = IGNORE_INDEX  # EOD and PAD predictions are not bytes of the data
    return inputs, targets


# ---------------------------------------------------------------------- running totals
@dataclass
class StageTally:
    """One router stage over many batches."""

    units: int = 0  # valid inputs of the stage
    concepts: int = 0  # boundaries it opened
    prob_sum: float = 0.0  # sum of p over valid units
    prob_hist: list[int] = field(default_factory=lambda: [0] * PROB_BINS)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # count of concepts of each length

    def add(self, other: StageTally) -> None:
        self.units += other.units
        self.concepts += other.concepts
        self.prob_sum += other.prob_sum
        self.prob_hist = [a + b for a, b in zip(self.prob_hist, other.prob_hist)]
        size = max(len(self.lengths), len(other.lengths))
        widen = lambda counts: np.pad(counts, (0, size - len(counts)))  # noqa: E731
        self.lengths = widen(self.lengths) + widen(other.lengths)


@dataclass
class MoETally:
    """One MoE layer over many batches: counts add up, per-batch averages are weighted by assignments."""

    tokens_per_expert: np.ndarray | None = None  # summed over batches
    dropped_weighted: float = 0.0  # sum of dropped_fraction x assignments
    logit_rms_weighted: float = 0.0  # sum of router_logit_rms x assignments
    assignments: float = 0.0  # (token, expert) assignments counted: the weight of each batch's averages

    def add_batch(self, tokens: np.ndarray, dropped: float, logit_rms: float) -> None:
        weight = float(tokens.sum())
        self.tokens_per_expert = tokens.copy() if self.tokens_per_expert is None else self.tokens_per_expert + tokens
        self.dropped_weighted += dropped * weight
        self.logit_rms_weighted += logit_rms * weight
        self.assignments += weight

    def add(self, other: MoETally) -> None:
        if other.tokens_per_expert is None:
            return
        if self.tokens_per_expert is None:
            self.tokens_per_expert = np.zeros_like(other.tokens_per_expert)
        self.tokens_per_expert = self.tokens_per_expert + other.tokens_per_expert
        self.dropped_weighted += other.dropped_weighted
        self.logit_rms_weighted += other.logit_rms_weighted
        self.assignments += other.assignments


@dataclass
class Tally:
    """Everything summed over the windows of one source (or over all sources)."""

    nats: float = 0.0  # summed cross entropy of the counted bytes
    bytes: int = 0  # counted document bytes
    documents: int = 0
    windows: int = 0
    stages: list[StageTally] = field(default_factory=list)
    moe: dict[str, MoETally] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.nats += other.nats
        self.bytes += other.bytes
        self.documents += other.documents
        self.windows += other.windows
        while len(self.stages) < len(other.stages):
            self.stages.append(StageTally())
        for mine, theirs in zip(self.stages, other.stages):
            mine.add(theirs)
        for name, layer in other.moe.items():
            self.moe.setdefault(name, MoETally()).add(layer)

    def summary(self) -> dict:
        out = {
            "bpb": bits_per_byte(self.nats, self.bytes),
            "ce_nats_per_byte": self.nats / max(self.bytes, 1),
            "bytes": self.bytes, "documents": self.documents, "windows": self.windows,
            "bytes_per_concept": 1.0, "stages": [], "moe": {},
        }
        bytes_in = self.stages[0].units if self.stages else 0
        for st in self.stages:
            out["stages"].append({
                "units": st.units, "concepts": st.concepts,
                "boundary_rate": st.concepts / max(st.units, 1),
                "compression": st.units / max(st.concepts, 1),  # inputs of this stage per concept
                "bytes_per_concept": bytes_in / max(st.concepts, 1),  # cumulative
                "mean_prob": st.prob_sum / max(st.units, 1),
                "prob_histogram": st.prob_hist,
                "concept_length": length_summary(st.lengths),
            })
        if self.stages:
            out["bytes_per_concept"] = out["stages"][0]["bytes_per_concept"]
        for name, layer in sorted(self.moe.items()):
            tokens = layer.tokens_per_expert
            share = tokens / max(tokens.sum(), 1e-12)
            entropy = float(-(share[share > 0] * np.log(share[share > 0])).sum())
            out["moe"][name] = {
                "tokens_per_expert": tokens.tolist(),
                "load_share": share.tolist(),
                "load_entropy": entropy,
                "load_entropy_max": math.log(len(tokens)),
                "max_over_mean_load": float(tokens.max() / max(tokens.mean(), 1e-12)),
                "dropped_fraction": layer.dropped_weighted / max(layer.assignments, 1e-12),
                "router_logit_rms": layer.logit_rms_weighted / max(layer.assignments, 1e-12),
            }
        return out


# ---------------------------------------------------------------------- router hooks
def stage_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The boundary router of each hierarchy stage, outermost first (empty for a byte model)."""
    routers, node = [], getattr(model, "body", None)
    while isinstance(node, HierarchyStage):
        routers.append(node.router)
        node = node.inner
    return routers


class RouteRecorder:
    """Forward hooks on the stage routers that keep the last call's (prob, boundary, valid) per stage."""

    def __init__(self, model: torch.nn.Module):
        self.calls: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for s, router in enumerate(stage_routers(model)):
            self.handles.append(router.register_forward_hook(self._hook(s)))

    def _hook(self, stage: int):
        def record(module, args, output: RoutingOutput):
            self.calls[stage] = (output.prob.detach().float(), output.boundary.detach(), output.valid.detach())
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> RouteRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def concept_lengths(boundary: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Histogram (count per length) of units per concept: from each boundary to the next one in its row,
    or to the row's last valid unit (valid units are a prefix of the row: padding only at the end)."""
    counts = np.zeros(boundary.shape[1] + 1, np.int64)
    for row_b, row_v in zip(boundary.cpu().numpy(), valid.cpu().numpy()):
        starts = np.flatnonzero(row_b)
        if len(starts):
            lengths = np.diff(np.append(starts, row_v.sum()))
            counts += np.bincount(lengths, minlength=len(counts))
    return counts


def length_summary(counts: np.ndarray) -> dict:
    """mean, median, p90 (lower quantiles: the smallest length reaching that share) and max of a histogram."""
    total = counts.sum()
    if total == 0:
        return {"mean": 0.0, "median": 0, "p90": 0, "max": 0}
    cumulative = np.cumsum(counts)
    quantile = lambda q: int(np.searchsorted(cumulative, q * total))  # noqa: E731
    return {"mean": float((np.arange(len(counts)) * counts).sum() / total), "median": quantile(0.5),
            "p90": quantile(0.9), "max": int(np.flatnonzero(counts)[-1])}


def stage_tally(prob: torch.Tensor, boundary: torch.Tensor, valid: torch.Tensor) -> StageTally:
    p = prob[valid]
    hist = torch.histc(p, bins=PROB_BINS, min=0.0, max=1.0).long().tolist() if p.numel() else [0] * PROB_BINS
    return StageTally(units=int(valid.sum()), concepts=int(boundary.sum()), prob_sum=float(p.sum()),
                      prob_hist=hist, lengths=concept_lengths(boundary, valid))


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_batch(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                   recorder: RouteRecorder) -> Tally:
    device = next(model.parameters()).device
    out = model(inputs.to(device))
    counted = labels != IGNORE_INDEX
    nats = F.cross_entropy(out.logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    tally = Tally(nats=float(nats), bytes=int(counted.sum()), windows=int(inputs.shape[0]))
    tally.stages = [stage_tally(*recorder.calls[s]) for s in sorted(recorder.calls)]
    for name, layer in out.stats.moe.items():
        tally.moe.setdefault(name, MoETally()).add_batch(
            layer.tokens_per_expert.float().cpu().numpy(), float(layer.dropped_fraction), float(layer.router_logit_rms))
    return tally


def counted_documents(documents: Iterable[bytes], tally: Tally) -> Iterator[bytes]:
    for doc in documents:
        tally.documents += 1
        yield doc


def evaluate_documents(model: torch.nn.Module, documents: Iterable[bytes], seq_len: int, batch_size: int) -> Tally:
    """One source: every byte of its documents predicted once, in order."""
    total = Tally()
    batches = window_batches(counted_documents(documents, total), seq_len, batch_size)
    was_training = model.training
    model.eval()
    try:
        with RouteRecorder(model) as recorder:
            for rows in batches:
                total.add(evaluate_batch(model, *window_batch(rows), recorder))
    finally:
        model.train(was_training)
    return total


def evaluate_share(model: torch.nn.Module, sources: Iterable[str], seq_len: int, batch_size: int, rank: int = 0,
                   world: int = 1, max_batches: int = 0) -> Tally:
    """One rank's share of `evaluate`'s windows over the shard sets `sources` (read in order; a batch never
    mixes sets): batch j of the whole sequence goes to rank j % world; max_batches > 0 reads only the first
    max_batches * world batches (0 = all). Returns the rank's Tally (documents not counted): the set's bits per
    byte is bits_per_byte(sum over ranks of nats, sum over ranks of bytes), which with world = 1 and
    max_batches = 0 is evaluate()'s overall bpb.

    Every rank makes the same number of forward calls, as expert-parallel MoE layers need: a rank short of a
    batch runs the first batch again with no counted label. Collective-free itself; `model` may be a
    DeepSpeed engine (its forward applies the training precision)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, world={world})")
    if max_batches < 0:
        raise ValueError(f"max_batches={max_batches} must be >= 0 (0 = the whole set)")
    batches = (rows for directory in sources
               for rows in window_batches(iter_shard_documents(directory), seq_len, batch_size))
    if max_batches:
        batches = islice(batches, max_batches * world)
    total, first, n_batches = Tally(), None, 0
    was_training = model.training
    model.eval()
    try:
        with RouteRecorder(model) as recorder:
            for j, rows in enumerate(batches):
                first = first or rows
                n_batches += 1
                if j % world == rank:
                    total.add(evaluate_batch(model, *window_batch(rows), recorder))
            mine = len(range(rank, n_batches, world))
            for _ in range(mine, -(-n_batches // world)):  # the padding forward calls: nothing counted
                inputs, labels = window_batch(first)
                evaluate_batch(model, inputs, torch.full_like(labels, IGNORE_INDEX), recorder)
    finally:
        model.train(was_training)
    return total


def evaluate(model: torch.nn.Module, sources: dict[str, str], seq_len: int, batch_size: int = 8) -> dict:
    """{name: shard-set directory} -> {"overall": summary, "sources": {name: summary}}."""
    if not sources:
        raise ValueError("evaluate needs at least one data source")
    overall = Tally()
    per_source = {}
    for name, directory in sources.items():
        tally = evaluate_documents(model, iter_shard_documents(directory), seq_len, batch_size)
        per_source[name] = tally.summary()
        overall.add(tally)
    return {"seq_len": seq_len, "batch_size": batch_size, "overall": overall.summary(), "sources": per_source}


# ---------------------------------------------------------------------- one text, for inspection
@dataclass
class RoutedText:
    data: bytes  # the text's bytes
    prob: list[float]  # stage-0 boundary probability of each byte
    boundary: list[bool]  # whether each byte opens a concept


@torch.no_grad()
def route_text(model: torch.nn.Module, data: bytes) -> RoutedText:
    """The stage-0 routing of a document: the model reads EOD + data (a document start, as in
    generation); the EOD's own concept is not part of the result."""
    if not stage_routers(model):
        raise ValueError("this model has no router (a plain byte-level model): there are no concept boundaries")
    device = next(model.parameters()).device
    ids = torch.tensor([[EOD_ID, *data]], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with RouteRecorder(model) as recorder:
            model(ids)
            prob, boundary, _ = recorder.calls[0]
    finally:
        model.train(was_training)
    return RoutedText(bytes(data), prob[0, 1:].tolist(), boundary[0, 1:].tolist())


# ---------------------------------------------------------------------- readable table
def format_table(result: dict) -> str:
    lines = [f"{'source':<32} {'documents':>10} {'bytes':>12} {'bpb':>8} {'bytes/concept':>14}"]
    rows = [*result["sources"].items(), ("overall", result["overall"])]
    for name, s in rows:
        lines.append(f"{name[-32:]:<32} {s['documents']:>10} {s['bytes']:>12} {s['bpb']:>8.4f} "
                     f"{s['bytes_per_concept']:>14.3f}")
    stages = result["overall"]["stages"]
    if stages:
        lines += ["", f"{'stage':<6} {'units':>12} {'concepts':>10} {'rate':>7} {'compress':>9} {'bytes/concept':>14} "
                      f"{'mean p':>7} {'len mean/median/p90/max':>24}"]
        for s, st in enumerate(stages):
            cl = st["concept_length"]
            lengths = f"{cl['mean']:.2f}/{cl['median']:.0f}/{cl['p90']:.0f}/{cl['max']}"
            lines.append(f"{s:<6} {st['units']:>12} {st['concepts']:>10} {st['boundary_rate']:>7.3f} "
                         f"{st['compression']:>9.3f} {st['bytes_per_concept']:>14.3f} {st['mean_prob']:>7.3f} "
                         f"{lengths:>24}")
    moe = result["overall"]["moe"]
    if moe:
        lines += ["", f"{'MoE layer':<22} {'entropy/max':>12} {'max/mean':>9} {'dropped':>8}  load share per expert"]
        for name, m in moe.items():
            shares = " ".join(f"{x:.2f}" for x in m["load_share"])
            lines.append(f"{name:<22} {m['load_entropy']:>5.3f}/{m['load_entropy_max']:<6.3f} "
                         f"{m['max_over_mean_load']:>9.3f} {m['dropped_fraction']:>8.4f}  {shares}")
    return "\n".join(lines)
