"""Cross-validation folds and label budgets of the fine-tuning benchmark.

Folds: scikit-learn ``StratifiedGroupKFold`` stratified by effusion and
grouped by patient, so no patient is on both sides of a split (docs/method.md §4).

Label budgets: the few-label settings (8 and 32 images) draw their images
from a fold's training part with a fixed seed, stratified by effusion, and
nested (the 8 images are among the 32), so the label-efficiency curve of a
method changes only by the labels added, not by a new draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BUDGETS: tuple[str, ...] = ("8", "32", "all")


def patient_folds(
    effusion: Sequence[bool] | np.ndarray,
    patients: Sequence[str] | np.ndarray,
    n_splits: int = 5,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` (train, test) index arrays, stratified by effusion, grouped by patient.

    Args:
        effusion: ``(N,)`` bool/0-1 stratification label.
        patients: ``(N,)`` patient ids (the groups).
        n_splits: number of folds.
        seed: shuffling seed (the same seed gives the same folds).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(effusion).astype(int)
    groups = np.asarray(patients)
    if len(y) != len(groups):
        raise ValueError(f"effusion has {len(y)} entries, patients {len(groups)}")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(te)) for tr, te in cv.split(np.zeros(len(y)), y, groups)]


def _stratified_order(idx: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order ``idx`` so that every prefix is as close as possible to the label proportions.

    Each class is shuffled; items are then interleaved by their fractional position
    within their class, so a prefix of length k holds about k * share of each class.
    """
    keys: list[tuple[float, int]] = []
    for c in np.unique(labels):
        members = rng.permutation(idx[labels == c])
        n = len(members)
        # Midpoint of the item's slot within its class: a prefix of length k then
        # holds about k * share of each class, and the minority class appears early.
        keys.extend(((rank + 0.5) / n, int(i)) for rank, i in enumerate(members))
    keys.sort(key=lambda kv: (kv[0], kv[1]))
    return np.array([i for _, i in keys], dtype=int)


def label_budget(
    train_idx: np.ndarray,
    effusion: Sequence[bool] | np.ndarray,
    budget: str | int,
    seed: int = 0,
    fold: int = 0,
) -> np.ndarray:
    """Indices of the labelled training images of a fold under a label ``budget``.

    Args:
        train_idx: the fold's training indices into the whole set.
        effusion: ``(N,)`` effusion flags of the whole set.
        budget: ``"all"`` or a number of images (``8``, ``"32"`` ...).
        seed, fold: the draw is a function of (seed, fold) only, hence deterministic;
            budgets of one fold are nested.

    Returns:
        sorted indices, a subset of ``train_idx`` of size ``min(budget, len(train_idx))``.
    """
    train_idx = np.asarray(train_idx, dtype=int)
    if str(budget) == "all":
        return np.sort(train_idx)
    k = int(budget)
    if k <= 0:
        raise ValueError(f"label budget must be positive, got {budget!r}")
    labels = np.asarray(effusion).astype(int)[train_idx]
    rng = np.random.default_rng([int(seed), int(fold), 7919])
    order = _stratified_order(train_idx, labels, rng)
    return np.sort(order[:k])
