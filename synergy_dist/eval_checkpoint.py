"""Evaluate a checkpoint or export on data sources: shard sets, or raw files preprocessed on the fly.

    result = evaluate_checkpoint("runs/tiny-cpu", ["shards/valid", "extra.jsonl.zst"], seq_len=1024)

Each data item is one source: a shard-set directory (with manifest.json) or a raw file (.jsonl /
.jsonl.zst / .jsonl.gz / .parquet / .txt), which is preprocessed into a temporary shard set.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from data_pipeline.preprocess import preprocess
from synergy_dist.evaluate import evaluate
from synergy_dist.loading import load_model

RAW_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".parquet", ".txt")


class DataError(ValueError):
    """A --data item that is neither a shard set nor a readable raw file, or a bad evaluation option."""


def source_name(item: str, taken: set[str]) -> str:
    """A short, unique name for a --data item (its last path component, the full path when ambiguous)."""
    name = Path(item.rstrip("/")).name or item
    return item if name in taken else name


def shard_sets(items: list[str], workdir: Path, text_field: str = "text") -> dict[str, str]:
    """{source name: shard-set directory}; raw files are preprocessed into workdir."""
    found: dict[str, str] = {}
    for i, item in enumerate(items):
        path = Path(item)
        name = source_name(item, set(found))
        if path.is_dir():
            if (path / "manifest.json").is_file():
                found[name] = str(path)
            elif (path / "valid" / "manifest.json").is_file():
                raise DataError(f"--data {item} holds a train/valid split, not one shard set; pass {path / 'valid'}")
            else:
                raise DataError(f"--data {item} is a directory without manifest.json; pass a shard set made by "
                                "synergy-preprocess (or a raw .jsonl/.jsonl.zst/.txt/.parquet file)")
        elif path.is_file() and path.name.endswith(RAW_SUFFIXES):
            out = workdir / f"source-{i}"
            preprocess([str(path)], out, progress=False, text_field=text_field)
            found[name] = str(out)
        elif path.is_file():
            raise DataError(f"--data {item}: unknown file type; use one of {', '.join(RAW_SUFFIXES)} or a shard set")
        else:
            raise DataError(f"--data {item} does not exist")
    return found


def evaluate_checkpoint(checkpoint: str | Path, data: list[str], seq_len: int | None = None, batch_size: int = 8,
                        text_field: str = "text", device: str = "cpu") -> dict:
    """evaluate()'s result for the model at `checkpoint` (run, checkpoint or export directory) on `data`,
    plus "checkpoint" (where the weights came from) and "data" ({source name: item}).

    seq_len defaults to the training data.seq_len. Raises LoadError or DataError."""
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be >= 1")
    if seq_len is not None and seq_len < 1:
        raise DataError(f"--seq-len {seq_len} must be >= 1")
    model, cfg, where = load_model(checkpoint, device)
    with tempfile.TemporaryDirectory(prefix="synergy-eval-") as tmp:
        sources = shard_sets(data, Path(tmp), text_field)
        result = evaluate(model, sources, seq_len=seq_len or cfg.data.seq_len, batch_size=batch_size)
    result["checkpoint"] = str(where)
    result["data"] = {name: str(Path(item)) for name, item in zip(result["sources"], data)}
    return result
