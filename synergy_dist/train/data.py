"""The trainer's data: which shard sets it reads (the configured ones, or the bundled sample corpus,
preprocessed on first use), the streaming dataset over them, and a step's micro-batches fetched so
that a data error stops every rank with the same one-line DataError (synergy-train exits 65)."""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

import synergy_dist
from data_pipeline.preprocess import preprocess
from data_pipeline.shards import CorruptShardError, ManifestError, load_manifest
from data_pipeline.stream import StreamingByteDataset
from synergy_dist.config import Config

T = TypeVar("T")


class DataError(RuntimeError):
    """The training data cannot be read: one line naming the file and the fix."""


def data_error(err: Exception) -> DataError:
    """A DataError for what the data pipeline raised, with the fix appended."""
    # Re-raised from a DataLoader worker, the message holds the worker's traceback: keep its last line,
    # the original "module.Class: message".
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    if text.startswith(("data_pipeline.shards.CorruptShardError: ", "data_pipeline.shards.ManifestError: ")):
        text = text.split(": ", 1)[1]
    if not isinstance(err, CorruptShardError):
        return DataError(text)
    shard = Path(text.split(": ", 1)[0].removeprefix("shard "))  # "shard PATH: what"
    return DataError(f"{text}; run `synergy-data verify {shard.parent}` to list every problem and re-create the set "
                     "with synergy-preprocess, or set data.on_corrupt=skip to train without the damaged shards")


def _agree(failure: str, world: int) -> None:
    """Collective: raise DataError on every rank when any rank failed (the lowest failing rank's message)."""
    if world > 1:
        flag = torch.tensor([1.0 if failure else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return
        messages: list = [None] * world
        dist.all_gather_object(messages, failure)
        failure = next(m for m in messages if m)
    if failure:
        raise DataError(failure)


def sample_shards(cfg: Config, is_main: bool) -> tuple[list, list]:
    """Train/valid shard sets of the bundled sample corpus, preprocessed once (by rank 0) on first use."""
    corpus = synergy_dist.SAMPLE_CORPUS
    fraction = cfg.data.sample_valid_fraction
    # The preprocess plan records its input path, so each installation (checkout) gets its own cache.
    key = hashlib.sha256(f"{corpus.resolve()}-{corpus.stat().st_size}-{fraction}".encode()).hexdigest()[:12]
    out = Path(cfg.data.sample_dir or Path.home() / ".cache" / "synergy_dist" / f"sample-{key}")
    if is_main:
        preprocess([str(corpus)], out, valid_fraction=fraction, progress=True)
    if dist.is_initialized():
        dist.barrier()
    return [str(out / "train")], [str(out / "valid")]


def data_sources(cfg: Config, is_main: bool) -> tuple[list, list]:
    """(training sources, validation sources): data.sources (paired with data.weights when given) and
    data.valid_sources, or the sample corpus's splits where they are empty. Collective when the sample
    corpus is used (rank 0 preprocesses it, the others wait)."""
    train_sources, valid_sources = list(cfg.data.sources), list(cfg.data.valid_sources)
    if not train_sources:
        train_sources, sample_valid = sample_shards(cfg, is_main)
        valid_sources = valid_sources or sample_valid
    if cfg.data.weights:
        train_sources = list(zip(train_sources, cfg.data.weights))
    return train_sources, valid_sources


def _show_skipped_shards() -> None:
    """The data pipeline's warning for each shard data.on_corrupt=skip leaves out goes to stderr (the
    run's log), in DataLoader workers too, whatever logging the rest of the process configured."""
    log = logging.getLogger("data_pipeline.shard_source")
    if not any(getattr(h, "synergy_skips", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("synergy-train: warning: %(message)s"))
        handler.synergy_skips = True
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False


def collective_read(read: Callable[[], T], world: int) -> T:
    """read() on every rank. Collective when world > 1: a rank that cannot read its data makes every rank
    raise the same DataError here, instead of leaving the others waiting for it in the next collective."""
    result, failure = None, ""
    try:
        result = read()
    except (ManifestError, CorruptShardError) as err:
        failure = str(data_error(err))
    _agree(failure, world)
    return result


def build_dataset(cfg: Config, sources: list, rank: int, world: int, global_batch: int) -> StreamingByteDataset:
    """This rank's share of the stream over `sources`, as collated micro-batches of batch.micro_batch_size.
    Collective when world > 1 (every rank learns whether any rank could not read the manifests)."""
    if cfg.data.on_corrupt == "skip":
        _show_skipped_shards()

    def read() -> StreamingByteDataset:
        try:
            return StreamingByteDataset(sources, seq_len=cfg.data.seq_len, global_batch_size=global_batch,
                                        micro_batch_size=cfg.batch.micro_batch_size, seed=cfg.seed,
                                        rank=rank, world_size=world, pack=cfg.data.pack,
                                        on_corrupt=cfg.data.on_corrupt,
                                        batched=True)  # yields collated micro-batches: no per-sample tensors
        except ValueError as err:  # e.g. a set holding less than one window
            if isinstance(err, ManifestError):
                raise
            raise ManifestError(f"data.sources: {err}") from None

    return collective_read(read, world)


def check_shard_sets(directories: list, world: int) -> None:
    """Read the manifests of `directories` (e.g. the validation sets, first read at the first evaluation),
    so that a missing or edited one stops the run at start. Collective when world > 1."""
    collective_read(lambda: [load_manifest(d) for d in directories], world)


def next_step_batches(batches: Iterator[dict], count: int, world: int) -> list[dict]:
    """The next `count` micro-batches of this rank; a data error on any rank stops every rank here, before
    any rank enters the step's gradient reduction (collective when world > 1)."""
    return collective_read(lambda: [next(batches) for _ in range(count)], world)
