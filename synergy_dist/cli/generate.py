"""`synergy-generate --checkpoint RUN_DIR|CHECKPOINT|EXPORT_DIR --prompt "..."` (or the prompt on stdin)

One prompt: streams the continuation to stdout as the model produces it, one byte at a time, decoding UTF-8
incrementally (a multi-byte character appears once all its bytes are there; invalid sequences show as
U+FFFD). Several prompts (--prompt repeated, or --prompts-file with one prompt per line): generates them in
batches of --batch-size and writes one JSON line per prompt, in order: {"prompt": ..., "completion": ...}
(--jsonl gives that format for a single prompt too). Generation stops after --max-bytes bytes or when the
model ends the document (EOD). Each continuation equals that prompt's generation alone with the same options.

    synergy-generate --checkpoint runs/tiny-cpu --prompt "Once upon a time" --max-bytes 300 --seed 0
    echo "def main():" | synergy-generate --checkpoint exported/tiny-cpu --temperature 0   # greedy
    synergy-generate --checkpoint runs/tiny-cpu --prompts-file prompts.txt --batch-size 32 --temperature 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from synergy_dist.checkpoint.safe_load import UnsafeCheckpointError
from synergy_dist.generation import generate_batches, stream
from synergy_dist.loading import LoadError, load_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synergy-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or synergy-export directory")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt; repeat for several (default: one prompt from stdin, less one trailing newline)")
    parser.add_argument("--prompts-file", default=None, help="a file with one prompt per line")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--jsonl", action="store_true", help="JSON lines output also for a single prompt")
    parser.add_argument("--max-bytes", type=int, default=256, help="most bytes to generate (default 256)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: smallest set with this probability")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the sampler, the same for every prompt (same seed, same text)")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation (text output)")
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
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size} must be >= 1"
    if args.prompt is not None and args.prompts_file is not None:
        return "--prompt and --prompts-file both given; pass the prompts one way"
    return None


def read_prompts(args: argparse.Namespace) -> list[bytes]:
    """The prompts as bytes: --prompt values, the lines of --prompts-file (without their newline) or stdin."""
    if args.prompt is not None:
        return [p.encode("utf-8") for p in args.prompt]
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file '{path}' does not exist; pass a file with one prompt per line")
        data = path.read_bytes()
        if not data:
            raise ValueError(f"--prompts-file '{path}' holds no prompts; write one prompt per line")
        return data.removesuffix(b"\n").split(b"\n")
    # stdin: one trailing newline (as `echo` adds) is not part of the prompt
    return [sys.stdin.read().removesuffix("\n").encode("utf-8")]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check(args)
    if problem:
        print(f"synergy-generate: {problem}", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args)
    except ValueError as err:
        print(f"synergy-generate: {err}", file=sys.stderr)
        return 2
    try:
        model, _, _ = load_model(args.checkpoint, args.device)
    except (LoadError, UnsafeCheckpointError) as err:
        print(f"synergy-generate: {err}", file=sys.stderr)
        return 2
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if len(prompts) == 1 and not args.jsonl:
        if args.echo:
            sys.stdout.write(prompts[0].decode("utf-8", errors="replace"))
        stream(model, prompts[0], sys.stdout, args.max_bytes, **sampling)
        sys.stdout.write("\n")
        return 0
    results = generate_batches(model, prompts, args.max_bytes, args.batch_size, **sampling)
    for prompt, completion in zip(prompts, results):
        record = {"prompt": prompt.decode("utf-8", errors="replace"),
                  "completion": completion.decode("utf-8", errors="replace")}
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
