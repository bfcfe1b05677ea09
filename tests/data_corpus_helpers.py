"""Small synthetic corpora for the data-pipeline tests (imported by tests/test_data_*.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from data_pipeline.vocab import EOD_ID


def make_documents(n: int, seed: int = 0, min_len: int = 0, max_len: int = 400) -> list[str]:
    """Varied text documents: ASCII, multi-byte UTF-8, newlines, some empty and some repeated."""
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop\nqrstuvwxyz.,;éüß中文😀"
    docs = []
    for i in range(n):
        if i % 17 == 5 and docs:
            docs.append(docs[rng.randrange(len(docs))])  # an exact duplicate
            continue
        length = rng.randint(min_len, max_len)
        docs.append(f"doc {i}: " + "".join(rng.choice(alphabet) for _ in range(length)))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}) + "\n")
    return path


def token_stream(docs: list[bytes]) -> np.ndarray:
    """The packed stream the dataset must reproduce: each document then EOD."""
    parts = []
    for d in docs:
        parts.append(np.frombuffer(d, dtype=np.uint8).astype(np.int64))
        parts.append(np.array([EOD_ID], dtype=np.int64))
    return np.concatenate(parts)
