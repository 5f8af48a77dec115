"""Bradley–Terry ratings from weighted pairwise battles, with bootstrap intervals (Arena-Hard's scoring).

A battle is (model_a, model_b, outcome, weight): outcome 1 = a won, 0 = b won, 0.5 = tie (a tie counts as half
a win for each, as Arena-Hard's `compute_mle_elo` does by duplicating tied battles). Ratings are on the Elo scale
(P(a beats b) = 1 / (1 + 10^((R_b − R_a)/400))), the anchor model fixed at `anchor_rating`. Pure numpy: the
maximum-likelihood fit is a concave problem, solved by Newton's method on the log-odds scale.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

SCALE = 400 / math.log(10)


def fit(battles: Sequence[tuple[str, str, float, float]], anchor: str, anchor_rating: float = 1000.0,
        iters: int = 100, ridge: float = 1e-6) -> dict[str, float]:
    """Maximum-likelihood ratings. A tiny ridge keeps a model that won (or lost) every battle finite."""
    models = sorted({m for b in battles for m in b[:2]})
    if anchor not in models:
        raise ValueError(f"anchor {anchor!r} is in no battle")
    idx = {m: i for i, m in enumerate(models)}
    a = np.array([idx[b[0]] for b in battles])
    b = np.array([idx[b[1]] for b in battles])
    y = np.array([float(t[2]) for t in battles])
    w = np.array([float(t[3]) for t in battles])
    theta = np.zeros(len(models))
    free = np.array([m != anchor for m in models])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(theta[a] - theta[b])))
        r = w * (y - p)
        grad = np.bincount(a, r, len(models)) - np.bincount(b, r, len(models)) - ridge * theta
        h = w * p * (1 - p)
        hess = np.zeros((len(models), len(models)))
        np.add.at(hess, (a, a), h)
        np.add.at(hess, (b, b), h)
        np.add.at(hess, (a, b), -h)
        np.add.at(hess, (b, a), -h)
        hess += ridge * np.eye(len(models))
        step = np.zeros_like(theta)
        step[free] = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return {m: float(anchor_rating + SCALE * theta[i]) for m, i in idx.items()}


def win_rate(r_model: float, r_baseline: float) -> float:
    """Predicted probability (0..1) that the model beats the baseline."""
    return 1 / (1 + 10 ** ((r_baseline - r_model) / 400))


def bootstrap(battles: Sequence[tuple[str, str, float, float]], anchor: str, rounds: int = 100, seed: int = 0,
              groups: Optional[Sequence[str]] = None) -> list[dict[str, float]]:
    """Ratings refitted on `rounds` resamples. With `groups` (one key per battle, e.g. the question id) whole
    groups are resampled, so the two games of one question stay together."""
    rng = np.random.default_rng(seed)
    keys = list(groups) if groups is not None else list(range(len(battles)))
    by_key: dict = {}
    for k, battle in zip(keys, battles):
        by_key.setdefault(k, []).append(battle)
    uniq = list(by_key)
    out = []
    for _ in range(rounds):
        pick = rng.integers(0, len(uniq), len(uniq))
        sample = [battle for i in pick for battle in by_key[uniq[i]]]
        out.append(fit(sample, anchor))
    return out


def scores(battles: Sequence[tuple[str, str, float, float]], baseline: str, rounds: int = 100, seed: int = 0,
           groups: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """Per model: score = predicted win rate (%) against the baseline, with a bootstrap 95% interval."""
    point = fit(battles, baseline)
    boots = bootstrap(battles, baseline, rounds, seed, groups) if rounds else []
    out = {}
    for m, r in point.items():
        samples = sorted(100 * win_rate(bt[m], bt[baseline]) for bt in boots if m in bt)
        lo, hi = (float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))) if samples else (None, None)
        out[m] = {"score": round(100 * win_rate(r, point[baseline]), 2), "rating": round(r, 2),
                  "ci95": [None if lo is None else round(lo, 2), None if hi is None else round(hi, 2)]}
    return out
