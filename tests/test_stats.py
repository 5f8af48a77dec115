"""The paired bootstrap of `make experiment` (allo.eval.stats) against cases whose answer is known by hand."""
from __future__ import annotations

import pytest

from allo.eval.stats import paired_bootstrap


def test_identical_models_differ_by_nothing():
    a = [[1, 0, 1, 1], [0, 0, 1]]
    p = paired_bootstrap(a, a)
    assert (p.diff, p.low, p.high, p.wins, p.losses) == (0.0, 0.0, 0.0, 0, 0)


def test_one_model_always_right_the_other_never():
    p = paired_bootstrap([[1, 1, 1]], [[0, 0, 0]])
    assert (p.diff, p.low, p.high, p.wins, p.losses) == (100.0, 100.0, 100.0, 3, 0)


def test_two_problems_by_hand():
    """Differences (1, 0): a resample of two draws has mean 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    30% and 70% quantiles are both 0.5 and the 95% interval spans 0 to 1."""
    a, b = [[1, 0]], [[0, 0]]
    assert paired_bootstrap(a, b, level=0.4).low == paired_bootstrap(a, b, level=0.4).high == 50.0
    p = paired_bootstrap(a, b)
    assert (p.diff, p.low, p.high, p.wins, p.losses) == (50.0, 0.0, 100.0, 1, 0)
    assert str(p) == "+50.0 [+0.0, +100.0]"


def test_problems_are_resampled_within_each_seed():
    """Seed 1 always differs by 1, seed 2 never: resampling within seeds keeps 10 of 40 differences at 1 in every
    resample (pooled resampling would not), so the interval has no width."""
    a = [[1] * 10, [0] * 30]
    b = [[0] * 10, [0] * 30]
    p = paired_bootstrap(a, b)
    assert (p.diff, p.low, p.high) == (25.0, 25.0, 25.0)


def test_wins_and_losses_are_counted_per_problem():
    p = paired_bootstrap([[1, 0, 1, 0], [1]], [[0, 1, 1, 0], [0]])
    assert (p.wins, p.losses) == (2, 1) and p.diff == pytest.approx(20.0)
    assert p.low <= p.diff <= p.high


@pytest.mark.parametrize("a, b, says", [([[1, 0]], [[1]], "seed 0 has 2 and 1 problems"),
                                        ([[1]], [[1], [0]], "1 and 2 seeds"), ([], [], "0 and 0 seeds")])
def test_unpaired_inputs_are_refused(a, b, says):
    with pytest.raises(ValueError, match=says):
        paired_bootstrap(a, b)


def test_hierarchical_bootstrap_by_hand():
    """Two seeds, one replicate, one problem each: seed A's difference is 1, seed B's 0. Seeds drawn with
    replacement give AA (¼: 100 points), AB or BA (½: 50), BB (¼: 0), so the 95% interval is [0, 100] and the
    two-sided p-value 2 × ¼ = 0.5; resampling problems within seeds alone sees no spread at all."""
    from allo.eval.stats import hierarchical_bootstrap

    a, b = [[[1]], [[0]]], [[[0]], [[0]]]
    h = hierarchical_bootstrap(a, b, resamples=20000)
    assert (h.diff, h.low, h.high) == (50.0, 0.0, 100.0)
    assert abs(h.p - 0.5) < 0.02  # 20000 draws: the tail's SE is 0.003
    flat = paired_bootstrap([[1], [0]], [[0], [0]])
    assert (flat.low, flat.high) == (50.0, 50.0)


def test_hierarchical_bootstrap_draws_a_replicate_per_seed():
    """One seed, two replicates that disagree (difference 1 and 0): half the draws take each, so the interval spans
    both, and the point estimate averages the replicates."""
    from allo.eval.stats import hierarchical_bootstrap

    h = hierarchical_bootstrap([[[1, 1], [0, 0]]], [[[0, 0], [0, 0]]], resamples=4000)
    assert (h.diff, h.low, h.high) == (50.0, 0.0, 100.0)
    with pytest.raises(ValueError, match="seed 0: replicates and problems must pair"):
        hierarchical_bootstrap([[[1, 1]]], [[[0]]])


def test_holm_by_hand():
    from allo.eval.stats import holm

    # sorted 0.01, 0.03, 0.04 -> ×3, ×2, ×1 = 0.03, 0.06, 0.04 -> kept non-decreasing: 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []
