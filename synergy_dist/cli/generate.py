"""`synergy-generate --checkpoint RUN_DIR|CHECKPOINT|EXPORT_DIR --prompt "..."` (or the prompt on stdin)

Streams the continuation to stdout as the model produces it, one byte at a time, decoding UTF-8
incrementally (a multi-byte character appears once all its bytes are there; invalid sequences show as
U+FFFD). Generation stops after --max-bytes bytes or when the model ends the document (EOD).

    synergy-generate --checkpoint runs/tiny-cpu --prompt "Once upon a time" --max-bytes 300 --seed 0
    echo "def main():" | synergy-generate --checkpoint exported/tiny-cpu --temperature 0   # greedy
"""

from __future__ import annotations

import argparse
import sys

import torch

from synergy_dist.checkpoint.safe_load import UnsafeCheckpointError
from synergy_dist.generation import stream
from synergy_dist.loading import LoadError, load_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synergy-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or synergy-export directory")
    parser.add_argument("--prompt", default=None, help="the prompt text (default: stdin, less one trailing newline)")
    parser.add_argument("--max-bytes", type=int, default=256, help="most bytes to generate (default 256)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: smallest set with this probability")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (same seed, same text)")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return parser


def check(args: argparse.Namespace) -> str | None:
    """The first bad option, as a message naming it and the fix."""
    if args.max_bytes < 0:
        return f"--max-bytes {args.max_bytes} must be >= 0"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k {args.top_k} must be >= 1 (leave it out to sample from every byte)"
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        return f"--top-p {args.top_p} must be in (0, 1]"
    if args.temperature < 0:
        return f"--temperature {args.temperature} must be >= 0 (0 = greedy)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check(args)
    if problem:
        print(f"synergy-generate: {problem}", file=sys.stderr)
        return 2
    # stdin: one trailing newline (as `echo` adds) is not part of the prompt
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().removesuffix("\n")
    try:
        model, _, _ = load_model(args.checkpoint, args.device)
    except (LoadError, UnsafeCheckpointError) as err:
        print(f"synergy-generate: {err}", file=sys.stderr)
        return 2
    if args.echo:
        sys.stdout.write(prompt)
    stream(model, prompt.encode("utf-8"), sys.stdout, args.max_bytes, args.temperature, args.top_k, args.top_p,
           args.seed)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
