"""Deterministic mixing of several sources by largest deficit (no random draws).

Weights are made rational, w_d = a_d / P with P <= MAX_PERIOD (0.7/0.3 stays exact: P = 10;
otherwise they are rounded to multiples of 1/MAX_PERIOD). Sample i of the global stream comes from
the source d that maximises a_d * (i + 1) - P * c_d, where c_d counts what source d gave to
positions 0..i-1 (ties go to the lower index). This keeps |c_d(n) - w_d * n| < 1 at every prefix,
and after P positions every c_d equals a_d exactly, so the schedule repeats with period P: one
table of P entries answers every position and every count in O(1).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

MAX_PERIOD = 1 << 14  # largest schedule period; weights are exact to 1 / MAX_PERIOD


def rational_weights(weights: list[float]) -> tuple[list[int], int]:
    """Integers a_d >= 1 and period P with sum(a) == P and a_d / P ~= w_d / sum(w)."""
    total = float(sum(weights))
    fractions = [Fraction(w / total).limit_denominator(MAX_PERIOD) for w in weights]
    period = math.lcm(*(f.denominator for f in fractions))
    if period <= MAX_PERIOD and sum(fractions) == 1 and all(f > 0 for f in fractions):
        return [int(f * period) for f in fractions], period
    # largest remainder rounding to multiples of 1 / MAX_PERIOD, at least 1 each
    exact = [w / total * MAX_PERIOD for w in weights]
    a = [max(1, int(x)) for x in exact]
    order = sorted(range(len(a)), key=lambda d: exact[d] - int(exact[d]), reverse=True)
    for d in order[: max(0, MAX_PERIOD - sum(a))]:
        a[d] += 1
    while sum(a) > MAX_PERIOD:  # only when the floors of 1 overshoot
        d = max(range(len(a)), key=lambda k: a[k])
        a[d] -= 1
    return a, MAX_PERIOD


class MixtureSchedule:
    def __init__(self, weights: list[float]):
        if not weights:
            raise ValueError("a mixture needs at least one source")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)):
                raise ValueError(f"mixture weights must be positive finite numbers, got {weights}")
        self.n_sources = len(weights)
        self.numerators, self.period = rational_weights(list(weights))
        self.weights = [a / self.period for a in self.numerators]
        self._table = self._build_table()  # source of each position in one period
        self._prefix = np.zeros((self.period + 1, self.n_sources), dtype=np.int64)  # counts before position
        np.cumsum(np.eye(self.n_sources, dtype=np.int64)[self._table], axis=0, out=self._prefix[1:])
        self._rank_in_period = self._prefix[np.arange(self.period), self._table]  # index within its source

    def _build_table(self) -> np.ndarray:
        a, p = self.numerators, self.period
        counts = [0] * self.n_sources
        table = np.empty(p, dtype=np.int64)
        for i in range(p):
            best = max(range(self.n_sources), key=lambda d: (a[d] * (i + 1) - p * counts[d], -d))
            counts[best] += 1
            table[i] = best
        return table

    def counts_at(self, n: int) -> list[int]:
        """Samples each source has given to the first n positions."""
        cycles, rest = divmod(int(n), self.period)
        return [cycles * a + int(c) for a, c in zip(self.numerators, self._prefix[rest])]

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global positions: the source of each and its index within that source's stream."""
        positions = np.asarray(positions, dtype=np.int64)
        cycles, rest = np.divmod(positions, self.period)
        sources = self._table[rest]
        numerators = np.asarray(self.numerators, dtype=np.int64)
        return sources, cycles * numerators[sources] + self._rank_in_period[rest]
