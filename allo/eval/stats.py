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


@dataclass(frozen=True)
class Hierarchical(Paired):
    p: float = 1.0  # two-sided bootstrap p-value of "no difference": 2 × the smaller tail of the resampled differences

    def __str__(self) -> str:
        return f"{super().__str__()} p={self.p:.2g}" if self.p else f"{super().__str__()} p=0 (no resample across 0)"


def hierarchical_bootstrap(a: Sequence[Sequence[Sequence[int]]], b: Sequence[Sequence[Sequence[int]]], *,
                           resamples: int = 10000, level: float = 0.95, seed: int = 0) -> Hierarchical:
    """a[s][r][i], b[s][r][i]: 1 if the model trained on seed s (training replicate r: the same seed retrained with
    only the numerics changed) got problem i right. Unlike `paired_bootstrap`, which treats each trained model as
    fixed, the interval carries training noise: each resample draws seeds with replacement, then a replicate of
    each drawn seed, then that seed's problems with replacement (a and b keep their pairing at every level). The
    difference is pooled over every problem, replicates averaged within a seed."""
    if len(a) != len(b) or not a:
        raise ValueError(f"hierarchical_bootstrap: {len(a)} and {len(b)} seeds; both need the same, at least one")
    seeds = []
    for s, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y) or not x or any(len(u) != len(v) or not len(u) for u, v in zip(x, y)):
            raise ValueError(f"hierarchical_bootstrap: seed {s}: replicates and problems must pair one to one")
        seeds.append(np.asarray(x, dtype=np.int64) - np.asarray(y, dtype=np.int64))  # replicates × problems
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for k in range(resamples):
        total = count = 0
        for s in rng.integers(0, len(seeds), size=len(seeds)):
            d = seeds[s][rng.integers(0, len(seeds[s]))]
            total += d[rng.integers(0, len(d), size=len(d))].sum()
            count += len(d)
        means[k] = total / count
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    pooled = np.concatenate([d.mean(axis=0) for d in seeds])
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    flat = np.concatenate([d.ravel() for d in seeds])
    return Hierarchical(100 * float(pooled.mean()), 100 * float(low), 100 * float(high), int((flat == 1).sum()),
                        int((flat == -1).sum()), p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for a family of contrasts (in their order): the k-th smallest is
    multiplied by (m − k + 1), and adjusted values never decrease along that order. Controls the family-wise error."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
