"""Where the benchmarks find the repository's files (configs/...) from any working directory."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def resolve(path: str | Path) -> Path:
    """A path as given when it exists (or is absolute), else relative to the repository (configs/... works anywhere)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p
