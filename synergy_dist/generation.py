"""Generation for people: stream one continuation as text (UTF-8 decoded as the bytes arrive), or generate the
continuations of many prompts in batches."""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
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


def prompt_bytes(prompts: Sequence[bytes | str]) -> list[bytes]:
    """The prompts as bytes (str is UTF-8 encoded); anything else is refused, naming the prompt."""
    if isinstance(prompts, (bytes, str)):
        raise ValueError("prompts must be a list of bytes or str, got a single "
                         f"{type(prompts).__name__}; wrap it in a list")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            prompt = prompt.encode("utf-8")
        if not isinstance(prompt, (bytes, bytearray)):
            raise ValueError(f"prompt {i} is {type(prompt).__name__}; pass bytes or str")
        encoded.append(bytes(prompt))
    return encoded


def generate_batches(model: torch.nn.Module, prompts: Sequence[bytes | str], max_bytes: int, batch_size: int,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None) -> Iterator[bytes]:
    """The continuation of each prompt, in order, generated batch_size prompts at a time. Each equals the
    prompt's generation alone with the same options (and the same seed)."""
    encoded = prompt_bytes(prompts)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    for start in range(0, len(encoded), batch_size):
        yield from model.generate(encoded[start:start + batch_size], max_bytes, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed)
