"""Merge shard sets (e.g. the outputs of a SLURM array of preprocess jobs) under one manifest.

The shards are hard-linked (copied where links are impossible) into the output directory and
renumbered in the order of the sources, so the merged set streams the sources one after the other.
Their checksums are carried over from the source manifests; the manifest is written last.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from data_pipeline.shards import MANIFEST_NAME, Manifest, ManifestError, load_manifest, make_manifest, save_manifest


def merge_shard_sets(sources: list[str | Path], output: str | Path) -> Manifest:
    if not sources:
        raise ManifestError("merge: no source shard sets given")
    output = Path(output)
    manifests = [(Path(s), load_manifest(s)) for s in sources]
    for directory, manifest in manifests:
        for info in manifest.shards:
            path = directory / info.name
            if not path.is_file() or path.stat().st_size != info.file_bytes:
                raise ManifestError(
                    f"merge: shard {path} is missing or its size differs from {directory / MANIFEST_NAME}; "
                    f"run `synergy-data verify {directory}`"
                )
    if output.exists() and not output.is_dir():
        raise ManifestError(f"merge: output {output} is a file; choose a new directory")
    if output.exists() and any(output.iterdir()):
        raise ManifestError(f"merge: output {output} is not empty; choose a new directory")
    output.mkdir(parents=True, exist_ok=True)
    merged = []
    for directory, manifest in manifests:
        for info in manifest.shards:
            name = f"shard-{len(merged):06d}.bin"
            target = output / name
            tmp = output / (name + ".tmp")
            try:
                os.link(directory / info.name, tmp)
            except OSError:
                shutil.copyfile(directory / info.name, tmp)
            os.replace(tmp, target)
            merged.append(replace(info, name=name))
    source = {
        "merged_from": [
            {"directory": str(d.resolve()), "source": m.source, "set_hash": m.set_hash} for d, m in manifests
        ]
    }
    manifest = make_manifest(merged, source)
    save_manifest(output, manifest)
    return manifest
