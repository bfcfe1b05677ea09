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
from pathlib import Path

import torch

from synergy_dist.checkpoint.safe_load import UnsafeCheckpointError
from synergy_dist.eval_checkpoint import DataError, evaluate_checkpoint
from synergy_dist.evaluate import format_table
from synergy_dist.loading import LoadError


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
    args = build_parser().parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.seq_len, args.batch_size, args.text_field,
                                     args.device)
    except (LoadError, DataError, UnsafeCheckpointError) as err:
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
