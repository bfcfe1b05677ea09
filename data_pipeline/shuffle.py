"""Deterministic two-level shuffle of n windows, as a pure function of (key, epoch, position).

Level 1: the windows are cut into blocks of `block` consecutive windows (consecutive windows sit
in the same zstd frames); each epoch permutes the blocks. Level 2: the permuted sequence is cut
into groups of `group` positions and each group is permuted. A position is therefore mapped to a
window without any state: no shuffle buffer exists that a resume could lose. Reading stays local:
the windows of one group come from at most group/block + 1 blocks.
"""

from __future__ import annotations

import numpy as np


def _rng(key: tuple[int, ...]) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class WindowOrder:
    """Maps (epoch, position) -> window id, a permutation of range(n) for every epoch."""

    def __init__(self, n: int, key: tuple[int, ...], block: int, group: int, shuffle: bool = True):
        if n < 1:
            raise ValueError(f"WindowOrder needs at least one window, got n={n}")
        self.n = n
        self.key = tuple(key)
        self.block = max(1, block)
        self.group = max(1, group)
        self.shuffle = shuffle
        self.n_blocks = -(-n // self.block)
        self._epoch: int | None = None
        self._block_order: np.ndarray | None = None  # block ids in epoch order
        self._block_starts: np.ndarray | None = None  # position where each slot of the order starts
        self._group_cache: dict[int, np.ndarray] = {}

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        order = _rng(self.key + (epoch, 0)).permutation(self.n_blocks)
        sizes = np.full(self.n_blocks, self.block, dtype=np.int64)
        sizes[-1] = self.n - self.block * (self.n_blocks - 1)
        starts = np.zeros(self.n_blocks + 1, dtype=np.int64)
        np.cumsum(sizes[order], out=starts[1:])
        self._epoch, self._block_order, self._block_starts = epoch, order, starts
        self._group_cache.clear()

    def _group_perm(self, epoch: int, g: int) -> np.ndarray:
        perm = self._group_cache.get(g)
        if perm is None:
            size = min(self.group, self.n - g * self.group)
            perm = _rng(self.key + (epoch, 1, g)).permutation(size)
            if len(self._group_cache) > 8:
                self._group_cache.clear()
            self._group_cache[g] = perm
        return perm

    def windows(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Window ids at the given positions (each in [0, n)) of the given epoch."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return positions.copy()
        self._load_epoch(epoch)
        groups = positions // self.group
        shuffled = np.empty_like(positions)
        for g in np.unique(groups):
            sel = groups == g
            shuffled[sel] = g * self.group + self._group_perm(epoch, int(g))[positions[sel] - g * self.group]
        slot = np.searchsorted(self._block_starts, shuffled, side="right") - 1
        return self._block_order[slot] * self.block + (shuffled - self._block_starts[slot])
