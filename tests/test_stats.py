"""Claim statistics: Holm against hand-checked values, the crossed (seed x fold) interval
against a hand computation, scipy's paired t-test, and its coverage by simulation."""

import numpy as np
import pytest
from scipy import stats

from pcl_viewer.evaluate.stats import crossed_interval, holm


def test_holm_matches_a_hand_checked_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04;
    # running maximum 0.02, 0.03, 0.06, 0.06; back in input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1; NaN (a claim not measured) stays out of the family (m = 2 here)
    out = holm([0.6, np.nan, 0.2])
    assert out[0] == pytest.approx(0.6) and out[2] == pytest.approx(0.4) and np.isnan(out[1])
    assert holm([0.3, 0.02]) == pytest.approx([0.3, 0.04])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8 x 2 capped at 1


def test_one_seed_is_the_paired_t_test_over_folds():
    d = np.array([[0.4, 1.1, -0.2, 0.9, 0.5]])
    res = crossed_interval(d)
    ref = stats.ttest_1samp(d[0], 0.0)
    lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d[0]))
    assert res.p == pytest.approx(ref.pvalue) and res.df == 4
    assert (res.low, res.high) == pytest.approx((lo, hi))
    # a non-zero null shifts the test, not the interval
    shifted = crossed_interval(d, null=-1.0)
    assert shifted.p == pytest.approx(stats.ttest_1samp(d[0], -1.0).pvalue)
    assert (shifted.low, shifted.high) == pytest.approx((lo, hi))


def test_crossed_interval_matches_a_hand_computation():
    # d = [[1, 2], [3, 6]]: mean 3; seed means 1.5, 4.5 -> MS_seed = 2 * 4.5 = 9;
    # fold means 2, 4 -> MS_fold = 2 * 2 = 4; residuals +-0.5 -> MS_res = 1.
    # Var(mean) = (MS_fold + MS_seed - MS_res) / 4 = 3;
    # Satterthwaite df = 3^2 / ((4/4)^2 + (9/4)^2 + (1/4)^2) = 9 / 6.125.
    res = crossed_interval(np.array([[1.0, 2.0], [3.0, 6.0]]))
    assert res.mean == pytest.approx(3.0) and res.se == pytest.approx(np.sqrt(3.0))
    assert res.df == pytest.approx(9 / 6.125)
    q = stats.t.ppf(0.975, 9 / 6.125)
    assert (res.low, res.high) == pytest.approx((3 - q * np.sqrt(3), 3 + q * np.sqrt(3)))
    assert res.p == pytest.approx(2 * stats.t.sf(3 / np.sqrt(3), 9 / 6.125))


def test_constant_differences_are_decided_without_spread():
    res = crossed_interval(np.full((3, 5), 0.7))
    assert res.se == 0 and res.low == res.high == pytest.approx(0.7) and res.p == 0.0
    assert crossed_interval(np.zeros((2, 3))).p == 1.0


def test_crossed_interval_covers_the_true_mean_and_the_naive_one_does_not():
    """3 seeds x 5 folds with shared fold and seed effects: the crossed interval covers
    the true mean about 95 % of the time; the naive t over 15 'independent' differences
    covers far less (this is what the crossed estimate is for)."""
    rng = np.random.default_rng(0)
    s, k, mu, reps = 3, 5, 0.3, 2000
    hit = naive = 0
    for _ in range(reps):
        d = (mu + rng.normal(0, 1.0, (1, k)) + rng.normal(0, 1.0, (s, 1))
             + rng.normal(0, 0.5, (s, k)))
        r = crossed_interval(d)
        hit += r.low <= mu <= r.high
        lo, hi = stats.t.interval(0.95, s * k - 1, loc=d.mean(), scale=stats.sem(d.ravel()))
        naive += lo <= mu <= hi
    assert 0.92 <= hit / reps <= 0.99
    assert naive / reps < 0.85


def test_incomplete_tables_are_refused():
    with pytest.raises(ValueError):
        crossed_interval(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError):
        crossed_interval(np.array([[1.0]]))
