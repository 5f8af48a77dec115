"""Paired comparisons of two models' per-problem correctness over several seeds: the statistics behind a claim that
one method beats another on the same test problems.

Each seed contributes its own test problems, scored 0/1 for both models. The difference of accuracies pools every
problem of every seed; its confidence interval comes from a paired bootstrap that resamples problems within each
seed (the seeds are the strata), so the pairing of the two models on one problem is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Paired:
    diff: float   # accuracy of a minus accuracy of b, in points (pooled over every problem of every seed)
    low: float    # the bootstrap interval's bounds, in points
    high: float
    wins: int     # problems a gets right and b wrong
    losses: int   # problems b gets right and a wrong

    def __str__(self) -> str:
        return f"{self.diff:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_bootstrap(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], *, resamples: int = 10000,
                     level: float = 0.95, seed: int = 0) -> Paired:
    """a[s][i], b[s][i]: 1 if the model got problem i of seed s right. Percentile interval at `level` of the pooled
    difference, from `resamples` resamplings of each seed's problems with replacement."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap: {len(a)} and {len(b)} seeds; both need the same seeds, at least one")
    diffs = []
    for s, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y) or not len(x):
            raise ValueError(f"paired_bootstrap: seed {s} has {len(x)} and {len(y)} problems; pair them one to one")
        diffs.append(np.asarray(x, dtype=np.int64) - np.asarray(y, dtype=np.int64))
    total = sum(len(d) for d in diffs)
    rng = np.random.default_rng(seed)
    sums = np.zeros(resamples, dtype=np.int64)
    for d in diffs:  # resample within the seed: every resample keeps each seed's number of problems
        sums += d[rng.integers(0, len(d), size=(resamples, len(d)))].sum(axis=1)
    low, high = np.quantile(sums / total, [(1 - level) / 2, (1 + level) / 2])
    pooled = np.concatenate(diffs)
    return Paired(100 * float(pooled.mean()), 100 * float(low), 100 * float(high), int((pooled == 1).sum()),
                  int((pooled == -1).sum()))
