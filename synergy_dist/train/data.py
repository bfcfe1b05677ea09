"""The trainer's data: which shard sets it reads (the configured ones, or the bundled sample corpus,
preprocessed on first use) and the streaming dataset over them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch.distributed as dist

import synergy_dist
from data_pipeline.preprocess import preprocess
from data_pipeline.stream import StreamingByteDataset
from synergy_dist.config import Config


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


def build_dataset(cfg: Config, sources: list, rank: int, world: int, global_batch: int) -> StreamingByteDataset:
    """This rank's share of the stream over `sources`, as collated micro-batches of batch.micro_batch_size."""
    return StreamingByteDataset(sources, seq_len=cfg.data.seq_len, global_batch_size=global_batch,
                                micro_batch_size=cfg.batch.micro_batch_size, seed=cfg.seed,
                                rank=rank, world_size=world, pack=cfg.data.pack,
                                on_corrupt=cfg.data.on_corrupt,
                                batched=True)  # yields collated micro-batches: no per-sample tensors
