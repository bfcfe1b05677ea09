"""`python -m benchmarks.quality`: bits per byte of SynergyLM variants vs a byte Transformer and a Llama/BPE anchor.

Protocol (issue 6, "The comparison"):
- training text: pydocs-train + pystdlib-code (minus a held-out slice of the code, chosen by a hash of
  each file's path), documents shuffled once with the seed and joined as `EOD doc EOD doc ...`;
  every row reads the same prefix of that stream, in the same order, with the same batch size,
  schedule (AdamW, linear warm-up then cosine: synergy_dist's lr_at), seed and number of training bytes,
  trained by the benchmarks' one plain loop (synergy_dist/bench/loop.py);
- compute: rows 6 and 7 are sized so that their training FLOPs per byte equal row 1's at its target
  compression (quality_rows.py); the FLOPs actually spent are measured per step from the realised
  compression (accounting.flops_per_byte) or the BPE token count, and reported relative to row 1;
- evaluation: bits per byte = total nats / (ln 2 * total UTF-8 bytes) over every byte of every
  document of pydocs-valid and of the held-out code, plus per pydocs section (library, c-api, howto,
  ...), read the way synergy_dist.evaluate reads a source: the section's documents in order as
  `EOD doc EOD doc ... EOD`, in windows of seq_len units that overlap by one, EOD predictions not
  counted (byte rows: synergy_dist.evaluate itself; the BPE row: the same windows over token ids);
  bytes per concept (or per BPE token) on pydocs-valid;
- each row trains in its own process on one pinned core: training bytes/s (wall and CPU time) and
  that process's peak resident memory are its own.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import zstandard

from benchmarks.anchors import llama_bpe
from benchmarks.quality_plots import write_plots
from benchmarks.quality_rows import (
    LLAMA_ROW,
    REFERENCE_ROW,
    ROW_NAMES,
    default_config,
    model_config,
    reference_flops_per_byte,
    row_info,
    with_overrides,
)
from data_pipeline.vocab import EOD_ID, IGNORE_INDEX, PAD_ID
from synergy_dist.bench.data import default_corpora_dir
from synergy_dist.bench.loop import PlainLoop
from synergy_dist.bench.results import (
    BenchResults,
    Figure,
    Target,
    ratio,
    write_results,
)
from synergy_dist.bench.timing import (
    Stopwatch,
    peak_rss_kib,
    pin_to_one_core,
    restored_affinity,
    rss_kib,
)
from synergy_dist.config import Config, config_from_dict
from synergy_dist.evaluate import evaluate_documents
from synergy_dist.model.accounting import flops_per_byte, param_counts
from synergy_dist.model.synergy import SynergyLM
from synergy_dist.report import ReportError

REPO = Path(__file__).resolve().parents[1]  # the checkout holding benchmarks/
TRAIN_FILES = ("pydocs-train.jsonl.zst", "pystdlib-code.jsonl.zst")
VALID_FILE = "pydocs-valid.jsonl.zst"
CODE_FILE = "pystdlib-code.jsonl.zst"
PYDOCS_SET, CODE_SET = "pydocs-valid", "pystdlib-code-heldout"
LN2 = math.log(2.0)
# rows' measured training FLOPs may differ from row 1's by this fraction (realised compression varies)
FLOPS_TOLERANCE = 0.15


@dataclass
class QualityConfig:
    # directory of pydocs-train, pystdlib-code, pydocs-valid .jsonl.zst; "" = $SYNERGY_CORPORA or ../shared/corpora
    corpora: str = ""
    rows: list[str] = field(default_factory=lambda: list(ROW_NAMES))  # which rows to run, in order
    train_bytes: int = 0  # training bytes per row (rounded down to whole steps); 0 = from budget_minutes
    budget_minutes: float = 15.0  # with train_bytes=0: row 1's measured speed x this many minutes of training
    seq_len: int = 512  # bytes per training window (BPE rows: about the same bytes in tokens)
    batch_size: int = 8  # windows per optimizer step, every row
    lr: float = 2e-3  # peak AdamW learning rate (SynergyLM groups also apply their lr_mult)
    warmup_fraction: float = 0.1  # linear warm-up over this fraction of the steps, then cosine
    min_lr_ratio: float = 0.1  # the cosine ends at min_lr_ratio x lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    grad_clip: float = 1.0  # global gradient-norm clip
    seed: int = 0  # document order, held-out split, and the initialisation unless init_seed is set
    init_seed: int = -1  # initialisation only (the seeds of a scaling study share the data); -1 = seed
    code_heldout_fraction: float = 0.03  # share of pystdlib-code files held out for the code evaluation
    eval_bytes: int = 0  # evaluate at most this many bytes per evaluation set (whole documents); 0 = all
    bpe_vocab: int = 8192  # byte-level BPE vocabulary of row 7 (8k-32k)
    bpe_seq_tokens: int = 0  # tokens per window of row 7; 0 = about seq_len bytes' worth (the quality table's form)
    model_overrides: list[str] = field(default_factory=list)  # model.* overrides of the SynergyLM rows (recipes)
    # further .jsonl.zst files in corpora, evaluated only (never trained on); the set is named after the file
    extra_eval: list[str] = field(default_factory=list)
    extra_eval_bytes: int = 0  # cap per evaluation-only set (they serve compression figures); 0 = eval_bytes
    work_dir: str = "bench_out/quality"  # the BPE tokenizer, per-row JSON results and plots are kept here
    table_from: list[str] = field(default_factory=list)  # train nothing: report the <row>.json results in these dirs

    def validate(self) -> None:
        if self.table_from:  # only earlier results are read
            missing = [d for d in self.table_from if not Path(d).is_dir()]
            if missing:
                raise FileNotFoundError(f"quality --table-from: {missing} not found; pass the OUT/quality "
                                        "directories of earlier runs")
            return
        if not self.corpora:
            self.corpora = str(default_corpora_dir())
        unknown = [r for r in self.rows if r not in ROW_NAMES]
        if unknown:
            raise ValueError(f"quality rows {unknown} are unknown; choose from {ROW_NAMES}")
        if not self.rows:
            raise ValueError("no quality rows selected; pass --row NAME (choices: " + ", ".join(ROW_NAMES) + ")")
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) < 2:
                raise ValueError(f"quality {key}={getattr(self, key)} must be >= 2")
        if self.train_bytes < 0 or (self.train_bytes == 0 and not self.budget_minutes > 0):
            raise ValueError("quality needs --train-bytes N > 0 or --budget-minutes M > 0")
        absent = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
        if LLAMA_ROW in self.rows and absent:
            raise ValueError(f"quality row {LLAMA_ROW!r} needs {absent}: pip install -e '.[anchors]' "
                             f"(or leave the row out with --row)")
        if not 8192 <= self.bpe_vocab <= 32768:
            raise ValueError(f"quality bpe_vocab={self.bpe_vocab} must be in 8192..32768 (issue 6: 8k-32k)")
        if not 0 <= self.code_heldout_fraction < 1:
            raise ValueError(f"quality code_heldout_fraction={self.code_heldout_fraction} must be in [0, 1)")
        for key in ("eval_bytes", "extra_eval_bytes"):
            if getattr(self, key) < 0:
                raise ValueError(f"quality {key}={getattr(self, key)} must be >= 0 (0 = the whole set)")
        if self.bpe_seq_tokens < 0 or 0 < self.bpe_seq_tokens < 8:
            raise ValueError(f"quality bpe_seq_tokens={self.bpe_seq_tokens} must be 0 (sized to seq_len) or >= 8")
        needed = (*TRAIN_FILES, VALID_FILE, *self.extra_eval)
        missing_files = [f for f in needed if not (Path(self.corpora) / f).is_file()]
        if missing_files:
            extra = " (or leave the evaluation-only files out with --extra-eval)" if set(missing_files) <= set(
                self.extra_eval) else ""
            raise FileNotFoundError(f"quality corpora: {missing_files} not found in {self.corpora}; "
                                    f"pass --corpora DIR (the directory of the shared .jsonl.zst corpora){extra}")

    def steps(self) -> int:
        return max(self.train_bytes // (self.batch_size * self.seq_len), 2)

    def model_seed(self) -> int:
        return self.seed if self.init_seed < 0 else self.init_seed


# ---------------------------------------------------------------------------------- arithmetic


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Bits per UTF-8 byte from a summed cross entropy in nats (any tokenisation)."""
    if total_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {total_bytes}")
    return total_nats / (LN2 * total_bytes)


def training_config(cfg: QualityConfig, steps: int) -> Config:
    """The rows' optimizer and schedule as a training Config (what PlainLoop and lr_at read): AdamW betas
    0.9/0.95, linear warm-up over warmup_fraction of the steps, then cosine down to min_lr_ratio x lr at
    the last step (lr_at reaches the floor at step train.max_steps; the last step is steps - 1)."""
    return config_from_dict({
        "train": {"lr": cfg.lr, "max_steps": max(1, steps - 1)},
        "schedule": {"kind": "cosine", "warmup_steps": max(1, round(cfg.warmup_fraction * steps)),
                     "min_lr_ratio": cfg.min_lr_ratio},
        "optim": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip},
    })


def train_bytes_for_budget(bytes_per_s: float, minutes: float, batch_size: int, seq_len: int) -> int:
    """The training bytes that take `minutes` at `bytes_per_s`, rounded down to whole steps (at least 2)."""
    step_bytes = batch_size * seq_len
    return max(int(bytes_per_s * minutes * 60) // step_bytes, 2) * step_bytes


# ---------------------------------------------------------------------------------- text


def read_documents(path: Path) -> list[tuple[str, str]]:
    """(source, text) of each line of a .jsonl.zst file."""
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        return [(d.get("source", path.name), d["text"]) for d in map(json.loads, io.TextIOWrapper(reader, "utf-8"))]


def held_out(source: str, fraction: float, seed: int) -> bool:
    """Deterministic, order-free split by a keyed hash of the document's source path."""
    digest = hashlib.blake2b(source.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def training_documents(cfg: QualityConfig) -> list[str]:
    docs = []
    for name in TRAIN_FILES:
        for source, text in read_documents(Path(cfg.corpora) / name):
            if name == CODE_FILE and held_out(source, cfg.code_heldout_fraction, cfg.seed):
                continue
            docs.append(text)
    random.Random(cfg.seed).shuffle(docs)
    return docs


def section(source: str) -> str:
    """'python-3.11-docs/library/abc.rst.txt' -> 'library'; top-level files -> '(top)'."""
    parts = source.split("/")
    return parts[1] if len(parts) > 2 else "(top)"


def evaluation_sets(cfg: QualityConfig) -> dict[str, list[tuple[str, str]]]:
    """{set name: [(group, text)]}: pydocs-valid grouped by section, and the held-out code files."""
    pydocs = [(section(s), t) for s, t in read_documents(Path(cfg.corpora) / VALID_FILE)]
    code = [("code", t) for s, t in read_documents(Path(cfg.corpora) / CODE_FILE)
            if held_out(s, cfg.code_heldout_fraction, cfg.seed)]
    sets = {PYDOCS_SET: pydocs, CODE_SET: code}
    for name in cfg.extra_eval:
        sets[eval_set_name(name)] = [(eval_set_name(name), t) for _, t in read_documents(Path(cfg.corpora) / name)]
    extra = {eval_set_name(name) for name in cfg.extra_eval}
    for name, docs in sets.items():
        cap = cfg.extra_eval_bytes if name in extra and cfg.extra_eval_bytes > 0 else cfg.eval_bytes
        if cap > 0:  # whole documents until the cap is reached
            sets[name] = first_documents(docs, cap)
    return {name: docs for name, docs in sets.items() if docs}


def first_documents(docs: list[tuple[str, str]], cap: int) -> list[tuple[str, str]]:
    """The leading whole documents of docs, stopping once they hold cap bytes or more."""
    kept, total = [], 0
    for group, text in docs:
        if total >= cap:
            break
        kept.append((group, text))
        total += len(text.encode())
    return kept


def eval_set_name(file_name: str) -> str:
    """'zh-fortunes.jsonl.zst' -> 'zh-fortunes'."""
    return file_name.split(".")[0]


def unit_stream(docs: list[list[int]], separator: int, needed: int) -> list[int]:
    """`sep doc sep doc ...` (units: bytes or token ids) until at least `needed` units."""
    stream: list[int] = []
    for doc in docs:
        stream.append(separator)
        stream.extend(doc)
        if len(stream) >= needed:
            return stream[:needed]
    raise ValueError(f"the training text holds {len(stream)} units, fewer than the {needed} the budget needs; "
                     "lower --train-bytes / --budget-minutes")


def packed_batches(stream: list[int], seq_len: int, batch_size: int, steps: int) -> Iterator[tuple]:
    """Consecutive windows: window i is units [i*T, i*T + T + 1) (inputs its first T, labels its last T)."""
    data = torch.tensor(stream, dtype=torch.long)
    for step in range(steps):
        rows = [data[(step * batch_size + b) * seq_len:(step * batch_size + b + 1) * seq_len + 1]
                for b in range(batch_size)]
        batch = torch.stack(rows)
        yield batch[:, :-1], batch[:, 1:]


def token_windows(documents: list[list[int]], separator: int, pad: int, seq_len: int) -> list[list[int]]:
    """synergy_dist.evaluate.windows over token ids (the BPE row): windows of seq_len + 1 ids over
    `sep doc sep doc ... sep`, consecutive windows sharing one id, the last one padded with `pad`."""
    stream = [separator]
    for doc in documents:
        stream += [*doc, separator]
    span = seq_len + 1
    return [stream[i:i + span] + [pad] * max(0, i + span - len(stream)) for i in range(0, len(stream) - 1, seq_len)]


def token_window_batch(rows: list[list[int]], separator: int):
    """(inputs, labels) of token windows; predictions of the separator (and of padding) are not counted,
    like synergy_dist.evaluate.window_batch does for EOD and PAD."""
    ids = torch.tensor(rows, dtype=torch.long)
    inputs, labels = ids[:, :-1].clone(), ids[:, 1:].clone()
    labels[labels == separator] = IGNORE_INDEX
    return inputs, labels


# ---------------------------------------------------------------------------------- one row (worker process)


@dataclass
class RowModel:
    """What the shared training/evaluation loop needs from a row."""

    module: object  # the torch module
    param_groups: list[dict]  # optimizer groups (with an optional "lr_mult")
    loss: Callable  # (inputs, labels) -> (mean loss to minimise, summed nats of labels, stats dict)
    train_flops: Callable  # (stats, inputs) -> measured training FLOPs of that step
    # (texts, batch_size) -> {"nats", "bytes", "units", "concepts", "documents"} over the texts in order
    evaluate: Callable
    separator: int  # the document start unit
    seq_len: int  # units per window
    encode: Callable  # text -> units
    details: dict  # params, sizes and design FLOPs, reported as they are
    byte_length: list[int] = field(default_factory=list)  # BPE rows: UTF-8 bytes of each token id


def synergy_row(name: str, cfg: QualityConfig) -> RowModel:
    model_cfg = with_overrides(model_config(name, cfg.seq_len), cfg.model_overrides)
    torch.manual_seed(cfg.model_seed())
    model = SynergyLM(model_cfg)
    n_stages = len(model_cfg.stages)

    def loss(inputs, labels):
        out = model(inputs, labels=labels)
        nats = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return out.loss, nats, forward_stats(out, inputs, n_stages)

    def evaluate(texts, batch_size):
        tally = evaluate_documents(model, (t.encode() for t in texts), cfg.seq_len, batch_size)
        concepts = tally.stages[0].concepts if tally.stages else tally.bytes  # a byte model: every byte
        return {"nats": tally.nats, "bytes": tally.bytes, "units": tally.bytes, "concepts": concepts,
                "documents": tally.documents}

    def train_flops(stats, inputs):
        return flops_per_byte(model_cfg, cfg.seq_len, stats["bytes_per_concept"] or None) * inputs.numel()

    counts = param_counts(model)
    details = {"params_total": counts["total"], "params_active": counts["active"],
               "design_train_flops_per_byte": flops_per_byte(model_cfg, cfg.seq_len),
               "model_config": asdict(model_cfg)}
    return RowModel(model, model.param_groups(cfg.weight_decay), loss, train_flops, evaluate, EOD_ID, cfg.seq_len,
                    lambda text: list(text.encode()), details)


def forward_stats(out, inputs, n_stages: int) -> dict:
    """What a training step of a byte row reports: valid inputs ("units"), stage-0 concepts, and the bytes
    per concept (cumulative, at least 1) each stage realised."""
    valid = int((inputs != PAD_ID).sum())
    rate = float(out.stats.boundary_rate) if n_stages else 1.0
    return {"units": valid, "concepts": rate * valid,
            "bytes_per_concept": [max(float(stage.bytes_per_concept), 1.0) for stage in out.stats.stages]}


def llama_row(cfg: QualityConfig, train_docs: list[str]) -> RowModel:
    tokenizer_path = Path(cfg.work_dir) / f"bpe-{cfg.bpe_vocab}-seed{cfg.seed}-heldout{cfg.code_heldout_fraction}.json"
    if tokenizer_path.is_file():
        from tokenizers import Tokenizer  # optional dependency (the anchors extra): only the BPE row needs it

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:  # trained on the whole training split (not only the budget's prefix), like a real BPE anchor
        tokenizer = llama_bpe.train_tokenizer(train_docs, cfg.bpe_vocab)
        tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        partial = tokenizer_path.with_name(f"{tokenizer_path.name}.{os.getpid()}.tmp")
        tokenizer.save(str(partial))
        os.replace(partial, tokenizer_path)  # runs sharing work_dir (one per core) never read half a file
    lengths = llama_bpe.token_byte_lengths(tokenizer)
    separator = tokenizer.token_to_id(llama_bpe.SEPARATOR)  # 0: the document start / end token
    sample = _docs_covering(train_docs, 2_000_000)  # the stream's first ~2 MB: bytes per token for the sizing
    sample_bytes = sum(len(t.encode()) for t in sample)
    bytes_per_token = sample_bytes / sum(len(e.ids) for e in tokenizer.encode_batch(sample))
    seq_len = cfg.bpe_seq_tokens or max(8, round(cfg.seq_len / bytes_per_token))
    target_params = param_counts(SynergyLM(default_config()))["total"]
    size = llama_bpe.choose_size(reference_flops_per_byte(cfg.seq_len), bytes_per_token, seq_len,
                                 tokenizer.get_vocab_size(), target_params)
    model = llama_bpe.build_model(size, seq_len + 1, cfg.model_seed())
    vocab = tokenizer.get_vocab_size()

    def loss(inputs, labels):
        logits = llama_bpe.next_token_logits(model, inputs).float().flatten(0, 1)
        nats = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        count = int((labels != IGNORE_INDEX).sum())  # tokens predicted: each is one "concept" of the BPE model
        return nats / max(count, 1), nats, {"units": count, "concepts": count}

    def evaluate(texts, batch_size):
        rows = token_windows([tokenizer.encode(t).ids for t in texts], separator, separator, seq_len)
        total = {"nats": 0.0, "bytes": sum(len(t.encode()) for t in texts), "units": 0, "concepts": 0,
                 "documents": len(texts)}
        model.eval()
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                _, nats, stats = loss(*token_window_batch(rows[i:i + batch_size], separator))
                total["nats"] += float(nats)
                total["units"] += stats["units"]
                total["concepts"] += stats["concepts"]
        model.train()
        return total

    def train_flops(stats, inputs):
        return llama_bpe.flops_per_token(size, seq_len) * inputs.numel()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    details = {"params_total": sum(p.numel() for p in model.parameters()), "llama_size": asdict(size),
               "bpe_vocab": vocab, "train_bytes_per_token_sample": bytes_per_token, "seq_len_tokens": seq_len,
               "design_train_flops_per_byte": llama_bpe.flops_per_token(size, seq_len) / bytes_per_token,
               "transformers_attention": getattr(model.config, "_attn_implementation", "unknown")}
    details["params_active"] = details["params_total"]
    return RowModel(model, groups, loss, train_flops, evaluate, separator, seq_len,
                    lambda text: tokenizer.encode(text).ids, details, lengths)


def train_row(row: RowModel, stream: list[int], cfg: QualityConfig, steps: int) -> dict:
    torch.manual_seed(cfg.model_seed())
    loop = PlainLoop(row.module, row.param_groups, training_config(cfg, steps))
    row.module.train()
    flops, losses, units, concepts, per_concept = 0.0, [], 0, 0.0, []
    clock = Stopwatch()
    for step, (inputs, labels) in enumerate(packed_batches(stream, row.seq_len, cfg.batch_size, steps)):
        [(nats, stats)] = loop.step(step, [(inputs, labels)], lambda batch: _loss_and_info(row, batch))
        flops += row.train_flops(stats, inputs)
        units += stats["units"]
        concepts += stats["concepts"]
        per_concept.append(stats["units"] / max(stats["concepts"], 1e-9))  # a learned router's compression settling
        # the training objective in bits per unit (byte or BPE token), separator targets included: the
        # curve's figure says so; bits per byte proper (docs/EVALUATION.md) is the evaluation's
        losses.append(float(nats.detach()) / (LN2 * int((labels != IGNORE_INDEX).sum())))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"training diverged at step {step}: loss {losses[-1]}")
    wall, cpu = clock.wall(), clock.cpu()
    return {"steps": steps, "train_wall_s": wall, "train_cpu_s": cpu, "train_flops": flops,
            "train_units_per_concept": units / max(concepts, 1e-9),
            "train_bits_per_unit_last10": sum(losses[-10:]) / len(losses[-10:]), "train_curve": losses,
            "train_units_per_concept_curve": per_concept}


def _loss_and_info(row: RowModel, batch: tuple) -> tuple:
    """PlainLoop's (loss, info) from a row's (loss, nats, stats)."""
    loss, nats, stats = row.loss(*batch)
    return loss, (nats, stats)


def evaluate_row(row: RowModel, sets: dict[str, list[tuple[str, str]]], batch_size: int) -> dict:
    """Per set and group (a pydocs section): summed nats, UTF-8 bytes, units read (tokens or bytes) and
    concepts; each group's documents are read in order as one stream (row.evaluate)."""
    results = {}
    for name, docs in sets.items():
        groups = {group: row.evaluate([t for g, t in docs if g == group], batch_size)
                  for group in dict.fromkeys(g for g, _ in docs)}
        total = {k: sum(g[k] for g in groups.values()) for k in ("nats", "bytes", "units", "concepts", "documents")}
        results[name] = {
            "bits_per_byte": bits_per_byte(total["nats"], total["bytes"]),
            "bytes_per_unit": total["bytes"] / total["units"],  # bytes per BPE token (1.0 for byte rows)
            "bytes_per_concept": total["bytes"] / total["concepts"],  # per concept (BPE: per token)
            "concepts": total["concepts"], **total,
            "groups": {g: dict(v, bits_per_byte=bits_per_byte(v["nats"], v["bytes"]))
                       for g, v in sorted(groups.items())},
        }
    return results


def run_row(name: str, cfg: QualityConfig) -> dict:
    """Build, train and evaluate one row in this process; returns its JSON-able result."""
    torch.set_num_threads(1)
    rss_before = rss_kib("VmRSS")
    train_docs = training_documents(cfg)
    row = build_row(name, cfg, train_docs)
    stream, steps, trained_bytes = row_stream(row, train_docs, cfg.steps() * cfg.batch_size * cfg.seq_len,
                                              cfg.batch_size)
    rss_model = rss_kib("VmRSS")
    result = {"row": name, "number": row_info(name).number, "what": row_info(name).what, **row.details,
              "train_bytes": trained_bytes, "seq_len_units": row.seq_len, "batch_size": cfg.batch_size}
    result.update(train_row(row, stream, cfg, steps))
    peak_train = peak_rss_kib(rss_before, rss_model)
    result["peak_rss_train_mib"] = peak_train / 1024  # before evaluation (its batches can peak higher)
    result["train_bytes_per_s_wall"] = trained_bytes / result["train_wall_s"]
    result["train_bytes_per_s_cpu"] = trained_bytes / result["train_cpu_s"]
    result["train_flops_per_byte"] = result["train_flops"] / trained_bytes
    result["eval"] = evaluate_row(row, evaluation_sets(cfg), cfg.batch_size)
    result["rss_start_mib"] = rss_before / 1024
    result["rss_with_text_and_model_mib"] = rss_model / 1024
    result["peak_rss_mib"] = peak_rss_kib(peak_train) / 1024
    return result


def build_row(name: str, cfg: QualityConfig, train_docs: list[str]) -> RowModel:
    return llama_row(cfg, train_docs) if name == LLAMA_ROW else synergy_row(name, cfg)


def row_stream(row: RowModel, train_docs: list[str], train_bytes: int, batch_size: int) -> tuple[list[int], int, int]:
    """The row's training units for `train_bytes` bytes of the stream: (units, steps, bytes the labels cover).
    Byte rows: exactly train_bytes (whole steps); BPE rows: whole steps of tokens that first cover them."""
    if row.byte_length:
        # twice the bytes, plus a whole step's slack at up to 16 bytes per token: a step of long windows
        # (512 tokens) can cover more than a small budget's bytes
        slack = 16 * batch_size * row.seq_len
        units = [row.encode(t) for t in _docs_covering(train_docs, 2 * train_bytes + slack)]
        return token_stream_for_bytes(units, row.separator, row.byte_length, train_bytes, batch_size * row.seq_len)
    stream = unit_stream([row.encode(t) for t in _docs_covering(train_docs, train_bytes + 1)], row.separator,
                         train_bytes + 1)
    return stream, train_bytes // (batch_size * row.seq_len), train_bytes


def _docs_covering(docs: list[str], n_bytes: int) -> list[str]:
    """The leading documents whose UTF-8 bytes (plus one separator each) reach n_bytes."""
    total = 0
    for i, text in enumerate(docs):
        total += len(text.encode()) + 1
        if total >= n_bytes:
            return docs[: i + 1]
    return docs


def token_stream_for_bytes(docs: list[list[int]], separator: int, byte_length: list[int], train_bytes: int,
                           tokens_per_step: int) -> tuple[list[int], int, int]:
    """The token stream `sep doc sep doc ...` cut to the whole steps whose labels first cover train_bytes
    UTF-8 bytes; returns (stream with its one extra leading input, steps, bytes of its labels)."""
    stream = unit_stream(docs, separator, sum(len(d) + 1 for d in docs))
    covered = n_labels = 0
    for unit in stream[1:]:
        n_labels += 1
        covered += byte_length[unit]
        if covered >= train_bytes:
            break
    steps = math.ceil(n_labels / tokens_per_step)
    needed = steps * tokens_per_step + 1
    if covered < train_bytes or len(stream) < needed:
        raise ValueError(f"the training text holds {len(stream)} tokens, fewer than the {needed} the budget needs; "
                         "lower --train-bytes / --budget-minutes")
    stream = stream[:needed]
    return stream, steps, sum(byte_length[u] for u in stream[1:])


def calibrate(cfg: QualityConfig, steps: int = 3, name: str = REFERENCE_ROW, warmup: int = 1) -> float:
    """Training bytes per CPU second of a row (`warmup` untimed steps, then `steps` timed), on the stream's start.
    A learned router's first steps can run at a very different speed (its compression settles over tens of
    steps), so a study calibrating a SynergyLM row warms up past them."""
    torch.set_num_threads(1)
    train_docs = training_documents(cfg)
    row = build_row(name, cfg, train_docs)
    step_bytes = cfg.batch_size * cfg.seq_len
    total = warmup + steps
    stream, n_steps, _ = row_stream(row, train_docs, total * step_bytes, cfg.batch_size)
    while n_steps < total:  # a BPE step covers more bytes than a byte row's: ask for more until it holds enough
        step_bytes *= 2
        stream, n_steps, _ = row_stream(row, train_docs, total * step_bytes, cfg.batch_size)
    loop = PlainLoop(row.module, row.param_groups, training_config(cfg, total))
    clock, timed_bytes = None, 0
    for step, (inputs, labels) in enumerate(packed_batches(stream, row.seq_len, cfg.batch_size, total)):
        if step == warmup:
            clock = Stopwatch()
        loop.step(step, [(inputs, labels)], lambda batch: _loss_and_info(row, batch))
        if step >= warmup:
            timed_bytes += sum(row.byte_length[u] for u in labels.flatten().tolist()) if row.byte_length \
                else labels.numel()
    return timed_bytes / clock.cpu()


def worker_main() -> None:
    """Entry of a row's subprocess: argv[1] is {"mode": "row"|"calibrate", "row": NAME, "cfg": {...}}."""
    job = json.loads(sys.argv[1])
    cfg = QualityConfig(**job["cfg"])
    if job["mode"] == "calibrate":
        print(json.dumps({"bytes_per_s_cpu": calibrate(cfg)}))
    else:
        print(json.dumps(run_row(job["row"], cfg)))


def run_worker(job: dict, timeout_s: float = 4 * 3600, entry: str = "benchmarks.quality") -> tuple[dict | None, str]:
    """Run `entry`.worker_main(job) in a fresh Python process (inheriting this one's CPU affinity); returns the
    last JSON line it printed, or None and its last error line."""
    code = f"from {entry} import worker_main; worker_main()"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # finds benchmarks/
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"{job.get('row', job['mode'])} exited with {proc.returncode}: {tail}"
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), ""


# ---------------------------------------------------------------------------------- the benchmark


def run(cfg: QualityConfig, command: str) -> BenchResults:
    """Train and evaluate the selected rows (each in its own process), or with table_from only read
    earlier results (e.g. two runs that shared the machine, one per core); then the figures, the
    goals, the markdown table and the plots (in work_dir)."""
    cfg.validate()
    report = BenchResults(name="quality", command=command)
    if cfg.table_from:
        results = load_results(cfg.table_from)
        report.notes.append(f"results of earlier runs, read from {', '.join(cfg.table_from)}")
        report.notes.extend(_settings_of(results))
    else:
        results = train_rows(cfg, report)
    add_figures(report, results)
    report.notes.extend(table_lines(results))
    report.appendix = markdown_table(results)
    try:
        paths = write_plots(results, list(ROW_NAMES), Path(cfg.work_dir))
        report.notes.append("plots: " + ", ".join(str(p) for p in paths))
    except ReportError as err:  # matplotlib is an optional extra
        report.notes.append(f"no plots: {err}")
    return report


def _settings_of(results: dict[str, dict]) -> list[str]:
    """The training settings the loaded rows share (or differ in), as notes."""
    keys = ("train_bytes", "steps", "batch_size")
    seen = {key: sorted({r[key] for r in results.values() if key in r}) for key in keys}
    settings = ", ".join(f"{k} {v[0] if len(v) == 1 else v}" for k, v in seen.items())
    return [f"loaded rows: {', '.join(results)}; " + settings]


def train_rows(cfg: QualityConfig, report: BenchResults) -> dict[str, dict]:
    cpu = pin_to_one_core()
    if cfg.train_bytes == 0:
        measured, error = run_worker({"mode": "calibrate", "cfg": asdict(cfg)})
        if measured is None:
            raise RuntimeError(f"quality calibration failed: {error}")
        cfg.train_bytes = train_bytes_for_budget(measured["bytes_per_s_cpu"], cfg.budget_minutes, cfg.batch_size,
                                                 cfg.seq_len)
        report.notes.append(f"budget: row 1 trained at {measured['bytes_per_s_cpu']:,.0f} B/s (CPU time, first steps) "
                            f"x {cfg.budget_minutes} min -> --train-bytes {cfg.train_bytes}")
    report.notes.append(
        f"settings: {cfg.steps()} steps x batch {cfg.batch_size} x seq_len {cfg.seq_len} bytes = {cfg.train_bytes} "
        f"training bytes per row; AdamW lr {cfg.lr} (betas 0.9/0.95, wd {cfg.weight_decay}, clip {cfg.grad_clip}), "
        f"{cfg.warmup_fraction:.0%} warm-up then cosine to {cfg.min_lr_ratio} x lr; seed {cfg.seed}; process pinned "
        f"to CPU {cpu}, torch threads 1; corpora {cfg.corpora}")
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in cfg.rows:
        result, error = run_worker({"mode": "row", "row": name, "cfg": asdict(cfg)})
        if result is None:
            report.notes.append(f"row {name} failed: {error}")
            continue
        results[name] = result
        (Path(cfg.work_dir) / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return results


def add_figures(report: BenchResults, results: dict[str, dict]) -> None:
    reference = results.get(REFERENCE_ROW)
    for name, r in results.items():
        pydocs = r["eval"].get(PYDOCS_SET, {})
        code = r["eval"].get(CODE_SET, {})
        report.add(Figure(f"{name}/bpb_pydocs_valid", pydocs.get("bits_per_byte"), "bit/B", [],
                          f"row {r['number']}: {r['what']}"))
        report.add(Figure(f"{name}/bpb_code_heldout", code.get("bits_per_byte"), "bit/B", [],
                          "held-out pystdlib-code files"))
        unit = "BPE token" if name == LLAMA_ROW else "concept"
        report.add(Figure(f"{name}/bytes_per_{unit.split()[-1]}", pydocs.get("bytes_per_concept"), "B", [],
                          f"UTF-8 bytes of pydocs-valid per {unit}"))
        report.add(Figure(f"{name}/train_bytes_per_s", r["train_bytes_per_s_cpu"], "B/s", [],
                          f"{r['train_bytes']} training bytes / process CPU time; wall: "
                          f"{r['train_bytes_per_s_wall']:,.0f} B/s"))
        report.add(Figure(f"{name}/peak_rss_train", r.get("peak_rss_train_mib"), "MiB", [],
                          f"VmHWM of the row's process after training (text + model loaded: "
                          f"{r['rss_with_text_and_model_mib']:.0f} MiB; after evaluation: "
                          f"{r['peak_rss_mib']:.0f} MiB)"))
        report.add(Figure(f"{name}/train_flops_vs_row1",
                          ratio(r["train_flops"], reference and reference["train_flops"]),
                          "x", [], f"measured {r['train_flops']:.3g} training FLOPs, params {r['params_total']:,}"))
    if reference is None:
        return
    spread = max(abs(r["train_flops"] / reference["train_flops"] - 1) for r in results.values())
    report.targets.append(Target(f"equal compute: largest |training FLOPs / row 1's - 1| over {len(results)} rows",
                                 spread, "<", FLOPS_TOLERANCE))
    bpb1 = reference["eval"][PYDOCS_SET]["bits_per_byte"]
    for rival, label in (("byte-transformer", "row 6"), (LLAMA_ROW, "row 7")):
        if rival in results:
            report.targets.append(Target(f"row 1 bits/byte on pydocs-valid below {label} ({rival})",
                                         ratio(bpb1, results[rival]["eval"][PYDOCS_SET]["bits_per_byte"]), "<", 1.0))
    if LLAMA_ROW in results:
        report.targets.append(Target("row 1 concepts / BPE tokens on pydocs-valid",
                                     ratio(reference["eval"][PYDOCS_SET]["concepts"],
                                           results[LLAMA_ROW]["eval"][PYDOCS_SET]["concepts"]), "<", 1.0))


def table_lines(results: dict[str, dict]) -> list[str]:
    """One readable line per row (the markdown renderer prints notes as a list)."""
    lines = []
    for name, r in results.items():
        e = r["eval"]
        code = e.get(CODE_SET, {}).get("bits_per_byte")
        lines.append(
            f"row {r['number']} {name}: pydocs-valid {e[PYDOCS_SET]['bits_per_byte']:.3f} bit/B"
            + (f", code {code:.3f} bit/B" if code is not None else "")
            + f", {e[PYDOCS_SET]['bytes_per_concept']:.2f} B/{'token' if name == LLAMA_ROW else 'concept'}"
            f", params {r['params_total']:,} (active {r['params_active']:,}), {r['train_flops']:.3g} train FLOPs"
            f", {r['train_bytes']:,} train bytes, {r['train_bytes_per_s_cpu']:,.0f} B/s (CPU)"
            f", peak {r['peak_rss_train_mib']:.0f} MiB in training"
            f"; per pydocs section: "
            + ", ".join(f"{g} {v['bits_per_byte']:.3f}" for g, v in e[PYDOCS_SET]["groups"].items()))
    return lines


def markdown_table(results: dict[str, dict]) -> str:
    """The comparison as one markdown table, rows in issue-6 order (what docs/BENCHMARKS.md shows)."""
    lines = ["| row | model | params (active) | pydocs-valid bit/B | held-out code bit/B "
             "| bytes per concept / BPE token | train FLOPs vs row 1 | train bytes | train bytes/s (CPU) "
             "| peak RSS in training |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    reference = results.get(REFERENCE_ROW)
    for name in sorted(results, key=lambda n: ROW_NAMES.index(n)):
        r, e = results[name], results[name]["eval"]
        code = e.get(CODE_SET, {}).get("bits_per_byte")
        flops = ratio(r["train_flops"], reference and reference["train_flops"])
        lines.append(
            f"| {r['number']} | {name}: {r['what']} | {r['params_total']:,} ({r['params_active']:,}) "
            f"| {e[PYDOCS_SET]['bits_per_byte']:.3f} | {'n/a' if code is None else f'{code:.3f}'} "
            f"| {e[PYDOCS_SET]['bytes_per_concept']:.2f} | {'n/a' if flops is None else f'{flops:.2f}x'} "
            f"| {r['train_bytes']:,} | {r['train_bytes_per_s_cpu']:,.0f} | {_mib(r.get('peak_rss_train_mib'))} |")
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MiB"


def load_results(directories: list[str]) -> dict[str, dict]:
    """Row results saved by earlier runs (WORK_DIR/<row>.json), e.g. two runs that shared the machine."""
    results = {}
    for directory in directories:
        for path in sorted(Path(directory).glob("*.json")):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("row") in ROW_NAMES:
                results[data["row"]] = data
    if not results:
        raise FileNotFoundError(f"no quality row results (<row>.json) in {directories}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--row", action="append", default=None, choices=ROW_NAMES,
                        help=f"quality row(s) to run (default: all of {ROW_NAMES})")
    parser.add_argument("--train-bytes", type=int, default=None, help="training bytes per row (overrides the budget)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="training minutes of row 1 on one core; sets --train-bytes (default 15)")
    parser.add_argument("--eval-bytes", type=int, default=None, help="cap per evaluation set (default: all)")
    parser.add_argument("--quality-seq-len", type=int, default=None, help="quality bytes per window (default 512)")
    parser.add_argument("--table-from", nargs="+", metavar="DIR", default=None,
                        help="train nothing: report the row results (<row>.json) of earlier runs' OUT/quality "
                             "directories together (e.g. two runs that shared the machine, one per core)")


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    cfg = QualityConfig()
    if getattr(args, "quick", False):  # a smoke run of the harness: 2 steps, small evaluation
        cfg.train_bytes, cfg.seq_len, cfg.batch_size, cfg.eval_bytes = 2 * 4 * 128, 128, 4, 20_000
    for key, arg in (("rows", "row"), ("corpora", "corpora"), ("train_bytes", "train_bytes"),
                     ("table_from", "table_from"), ("budget_minutes", "budget_minutes"), ("eval_bytes", "eval_bytes"),
                     ("seq_len", "quality_seq_len")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(cfg, key, value)
    if getattr(args, "budget_minutes", None) is not None and getattr(args, "train_bytes", None) is None:
        cfg.train_bytes = 0  # an explicit budget wins over --quick's fixed size
    out = getattr(args, "out", None)
    if out:
        cfg.work_dir = str(Path(out) / "quality")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", metavar="DIR",
                        help="where JSON + markdown go (default bench_out)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-run the harness (tiny sizes): checks it works, numbers mean little")
    parser.add_argument("--corpora", default=None, metavar="DIR",
                        help="directory of the shared corpora (default: $SYNERGY_CORPORA or ../shared/corpora)")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.quality", *(sys.argv[1:] if argv is None else argv)])
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    try:
        with restored_affinity():  # training the rows pins this process to one core
            report = run(config_from_args(args), command)
    except (ValueError, FileNotFoundError) as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = write_results(Path(args.out), [report], stem="quality", load_at_start=load_at_start)
    print(md_path.read_text())
    print(f"quality: wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
