"""`synergy-data`: inspect, verify and merge shard sets. Exit status 0 only when all is well."""

from __future__ import annotations

import argparse
import sys

from data_pipeline.merge import merge_shard_sets
from data_pipeline.shards import ManifestError, load_manifest, verify_shard_set


def cmd_info(args) -> int:
    manifest = load_manifest(args.directory)
    raw = manifest.total_bytes
    disk = sum(s.file_bytes for s in manifest.shards)
    print(f"shard set:   {args.directory}")
    print(f"format:      {manifest.format} v{manifest.version}")
    print(f"documents:   {manifest.total_documents}")
    print(f"bytes:       {raw} ({raw / 1e6:.2f} MB raw, {disk / 1e6:.2f} MB on disk, ratio {raw / max(disk, 1):.2f})")
    print(f"shards:      {len(manifest.shards)} ({sum(s.frames for s in manifest.shards)} frames)")
    print(f"set hash:    {manifest.set_hash}")
    inputs = manifest.source.get("inputs") or [m.get("directory") for m in manifest.source.get("merged_from", [])]
    print(f"made from:   {', '.join(map(str, inputs))}")
    return 0


def cmd_verify(args) -> int:
    problems = verify_shard_set(args.directory)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{args.directory}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    manifest = load_manifest(args.directory)
    print(
        f"OK {args.directory}: {len(manifest.shards)} shards, {manifest.total_documents} documents, "
        f"{manifest.total_bytes} bytes"
    )
    return 0


def cmd_merge(args) -> int:
    manifest = merge_shard_sets(args.sources, args.output)
    print(
        f"merged {len(args.sources)} shard sets into {args.output}: {len(manifest.shards)} shards, "
        f"{manifest.total_documents} documents"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synergy-data", description="Inspect, verify and merge byte-shard sets.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the totals of a shard set")
    info.add_argument("directory")
    info.set_defaults(run=cmd_info)
    verify = sub.add_parser("verify", help="check every checksum, index and total of a shard set")
    verify.add_argument("directory")
    verify.set_defaults(run=cmd_verify)
    merge = sub.add_parser("merge", help="write one manifest over several shard sets (e.g. a SLURM array's outputs)")
    merge.add_argument("--output", "-o", required=True, help="new directory for the merged set")
    merge.add_argument("sources", nargs="+", metavar="SRC_DIR")
    merge.set_defaults(run=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ManifestError as e:
        print(f"synergy-data: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a merge output on a read-only file system
        print(f"synergy-data: error: cannot access {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
