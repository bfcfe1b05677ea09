"""`train.compile`: run every block of the model through torch.compile, leaving the routing between them eager.

The hierarchy's router decides per batch how many concepts the inner networks see, so whole-model graphs
would break at every data-dependent size. The blocks (a mixer and a feed-forward over a (B, T, D) tensor)
are where the FLOPs are, and they compile into one graph per kind of block with the length T symbolic
(dynamic=True), shared by every block of that kind: the number of graphs stays bounded whatever the
concept counts (tests/test_compile.py counts them). Cached generation calls the blocks with a cache and one
position at a time; those calls stay eager. Parameters keep their names, so checkpoints of compiled and
eager runs are interchangeable.
"""

from __future__ import annotations

import torch
from torch import nn

from synergy_dist.config import COMPILE_BACKENDS
from synergy_dist.model.stack import Block


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile the uncached forward of every Block of `model` in place; returns how many blocks."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend {backend!r} is not supported; use one of {', '.join(COMPILE_BACKENDS)}")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.forward = _compiled_forward(block.forward, backend)
    return len(blocks)


def _compiled_forward(eager, backend: str):
    compiled = torch.compile(eager, dynamic=True, backend=backend)

    def forward(x, valid=None, cache=None, seq_idx=None):
        return eager(x, valid, cache, seq_idx) if cache is not None else compiled(x, valid, cache, seq_idx)

    return forward


def compile_counts() -> dict[str, int]:
    """What compiling cost so far in this process: `compiled_graphs`, every graph dynamo built (graph-break pieces
    and recompilations included), and `block_variants`, the compiled versions of the block forward (one per block
    width and input variant: the first compile of each plus every recompilation). Both must stay bounded."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # dynamo's own view of its cache
    from torch._dynamo.utils import counters

    return {"compiled_graphs": int(counters["stats"]["unique_graphs"]),
            "block_variants": len(_debug_get_cache_entry_list(Block.forward.__code__))}
