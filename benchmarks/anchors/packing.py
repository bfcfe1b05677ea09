"""Pack a stream of documents into fixed windows of seq_len + 1 ids (bytes 0..255, EOD = 256).

Shared by the anchor scripts so every anchor does the same packing work as our stream does.
Standalone on purpose (numpy only): the MosaicML anchor runs in a venv without synergy_dist.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

EOD_ID = 256  # must equal data_pipeline.vocab.EOD_ID; tests check it


def pack_windows(documents: Iterable[bytes], window: int) -> Iterator[np.ndarray]:
    """Yield int64 arrays of `window` ids: documents concatenated, EOD after each, cut into windows."""
    pending: list[np.ndarray] = []
    pending_len = 0
    for doc in documents:
        ids = np.empty(len(doc) + 1, dtype=np.int64)
        ids[:-1] = np.frombuffer(doc, dtype=np.uint8)
        ids[-1] = EOD_ID
        pending.append(ids)
        pending_len += len(ids)
        if pending_len < window:
            continue
        flat = np.concatenate(pending)
        full = len(flat) // window
        for i in range(full):
            yield flat[i * window : (i + 1) * window]
        rest = flat[full * window :]
        pending, pending_len = [rest], len(rest)
