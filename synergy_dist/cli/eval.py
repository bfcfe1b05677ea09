"""`synergy-eval --checkpoint RUN_DIR|CHECKPOINT|EXPORT_DIR --data SHARDS_OR_FILES [...]`

Bits per byte overall and per source, realised bytes per concept, boundary and MoE statistics of a
trained model on evaluation data; a readable table on stdout and, with --json OUT, the full result.

    synergy-eval --checkpoint runs/tiny-cpu --data shards/valid
    synergy-eval --checkpoint exported/tiny-cpu --data a.jsonl.zst b.txt --seq-len 1024 --json eval.json

Each --data item is one source: a shard-set directory (with manifest.json) or a raw file
(.jsonl / .jsonl.zst / .jsonl.gz / .parquet / .txt), which is preprocessed into a temporary shard set.
A checkpoint from any number of ranks works (expert shards are merged as synergy-export does).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

RAW_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".parquet", ".txt")


class DataError(ValueError):
    """A --data item that is neither a shard set nor a readable raw file."""


def source_name(item: str, taken: set[str]) -> str:
    """A short, unique name for a --data item (its last path component, the full path when ambiguous)."""
    name = Path(item.rstrip("/")).name or item
    return item if name in taken else name


def shard_sets(items: list[str], workdir: Path, text_field: str = "text") -> dict[str, str]:
    """{source name: shard-set directory}; raw files are preprocessed into workdir."""
    from data_pipeline.preprocess import preprocess

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


def run(args: argparse.Namespace) -> dict:
    from synergy_dist.evaluate import evaluate
    from synergy_dist.loading import load_model

    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size} must be >= 1")
    if args.seq_len is not None and args.seq_len < 1:
        raise DataError(f"--seq-len {args.seq_len} must be >= 1")
    model, cfg, where = load_model(args.checkpoint, args.device)
    seq_len = args.seq_len or cfg.data.seq_len
    with tempfile.TemporaryDirectory(prefix="synergy-eval-") as tmp:
        sources = shard_sets(args.data, Path(tmp), args.text_field)
        result = evaluate(model, sources, seq_len=seq_len, batch_size=args.batch_size)
    result["checkpoint"] = str(where)
    result["data"] = {name: str(Path(item)) for name, item in zip(result["sources"], args.data)}
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synergy-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or synergy-export directory")
    parser.add_argument("--data", nargs="+", required=True, help="shard-set directories or raw files, one source each")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the training data.seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--json", type=Path, default=None, help="write the full result as JSON here")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text of raw .jsonl inputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> int:
    from synergy_dist.evaluate import format_table
    from synergy_dist.loading import LoadError

    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (LoadError, DataError) as err:
        print(f"synergy-eval: {err}", file=sys.stderr)
        return 2
    print(f"checkpoint: {result['checkpoint']}   seq_len {result['seq_len']}   batch {result['batch_size']}")
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
