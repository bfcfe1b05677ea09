"""Stream a model's continuation of a prompt as text, decoding UTF-8 as the bytes arrive."""

from __future__ import annotations

import codecs
from typing import TextIO

import torch


def stream(model: torch.nn.Module, prompt: bytes, out: TextIO, max_bytes: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> bytes:
    """Write the continuation of prompt to out as it is generated; returns its bytes.

    A multi-byte character appears once all its bytes are there; invalid sequences, and an unfinished
    character at the end, show as U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    produced = bytearray()
    for piece in model.generate_iter(prompt, max_bytes, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed):
        produced += piece
        text = decoder.decode(piece)
        if text:
            out.write(text)
            out.flush()
    out.write(decoder.decode(b"", final=True))
    out.flush()
    return bytes(produced)
