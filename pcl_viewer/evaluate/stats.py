"""Statistics of the benchmark's claims: paired differences over (seed, fold) and Holm.

A claim "A beats B" is judged on the paired differences ``d[s, k] = A[s, k] - B[s, k]``
of one metric over pre-training seeds ``s`` and folds ``k`` (the same fold split and
fine-tuning seed on both sides). The design is crossed: every seed is fine-tuned on
every fold, so a fold's test images (and its fine-tuning seed) are shared by all
seeds, and a seed's pre-trained weights by all folds. The model

    d[s, k] = mu + f_k + g_s + e_sk,   f ~ (0, sf^2), g ~ (0, sg^2), e ~ (0, se^2)

gives ``Var(mean d) = sf^2 / K + sg^2 / S + se^2 / (S K)``. Treating the S*K
differences as independent would ignore the shared fold and seed effects and give
intervals that are too narrow; averaging seeds within folds would ignore the shared
seed effect. :func:`crossed_interval` estimates the three components from the
two-way ANOVA mean squares (negative estimates set to 0), and uses a Student t
interval with Satterthwaite's degrees of freedom. With one seed it is exactly the
paired t-test over folds (scipy's ``ttest_1samp`` on the differences).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences with its t interval and two-sided p-value.

    ``p`` tests ``mean == null`` (two-sided); ``low``/``high`` is the ``level``
    interval of the mean; ``n_seeds`` x ``n_folds`` differences were used.
    """

    mean: float
    low: float
    high: float
    se: float
    df: float
    p: float
    n_seeds: int
    n_folds: int
    null: float = 0.0


def crossed_interval(d: np.ndarray, null: float = 0.0, level: float = 0.95) -> Interval:
    """t interval and p-value of the mean of a complete ``(S seeds, K folds)`` table.

    Args:
        d: ``(S, K)`` paired differences, finite (S or K may be 1, not both).
        null: the value the two-sided test compares the mean with.
        level: confidence level of the interval.
    """
    d = np.asarray(d, float)
    if d.ndim != 2 or not np.isfinite(d).all():
        raise ValueError(f"need a complete 2-D table of finite differences, got {d.shape}")
    s, k = d.shape
    n = s * k
    if n < 2:
        raise ValueError("one difference has no interval")
    mean = float(d.mean())
    if s == 1 or k == 1:  # one factor: the ordinary one-sample t over the n differences
        flat = d.ravel()
        var = float(flat.var(ddof=1)) / n
        df = float(n - 1)
    else:
        seed_means, fold_means = d.mean(axis=1), d.mean(axis=0)
        ms_seed = k * float(((seed_means - mean) ** 2).sum()) / (s - 1)
        ms_fold = s * float(((fold_means - mean) ** 2).sum()) / (k - 1)
        resid = d - seed_means[:, None] - fold_means[None, :] + mean
        ms_res = float((resid**2).sum()) / ((s - 1) * (k - 1))
        # Var(mean) = sf^2/K + sg^2/S + se^2/(SK) with sf^2 = (MS_fold - MS_res)/S,
        # sg^2 = (MS_seed - MS_res)/K, se^2 = MS_res; a negative component counts as 0.
        use_f, use_s = ms_fold > ms_res, ms_seed > ms_res
        coef = {"fold": use_f / n, "seed": use_s / n, "res": (1 - use_f - use_s) / n}
        ms = {"fold": ms_fold, "seed": ms_seed, "res": ms_res}
        dfs = {"fold": k - 1, "seed": s - 1, "res": (s - 1) * (k - 1)}
        var = sum(coef[x] * ms[x] for x in ms)
        denom = sum((coef[x] * ms[x]) ** 2 / dfs[x] for x in ms)
        df = var**2 / denom if denom > 0 else float(n - 1)  # Satterthwaite
    se = float(np.sqrt(max(var, 0.0)))
    if se <= 1e-12 * max(1.0, abs(mean)):  # every difference equal (up to rounding)
        p = 1.0 if mean == null else 0.0
        return Interval(mean, mean, mean, 0.0, float(df), p, s, k, null)
    q = float(stats.t.ppf(0.5 + level / 2, df))
    t = (mean - null) / se
    p = float(2 * stats.t.sf(abs(t), df))
    return Interval(mean, mean - q * se, mean + q * se, se, float(df), p, s, k, null)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), NaN kept as NaN.

    Written out (five lines) rather than adding statsmodels for ``multipletests``:
    sort the m finite p-values ascending, multiply the i-th (0-based) by m - i, take
    the running maximum, cap at 1, and put them back in the original order.
    """
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    order = idx[np.argsort(p[idx], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adj
    return out
