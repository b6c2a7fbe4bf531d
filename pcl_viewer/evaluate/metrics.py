"""Segmentation metrics of the benchmark, computed by MONAI.

Dice, 95th-percentile Hausdorff distance (HD95) and average symmetric surface
distance (ASD) over the two lung classes (labels 1 and 2; background is not
scored), per image, then averaged over the two lungs. Dice is MONAI's
``DiceMetric``; HD95 and ASD are MONAI's ``HausdorffDistanceMetric(percentile=95)``
and ``SurfaceDistanceMetric(symmetric=True)`` definitions computed from one
call of MONAI's ``get_edge_surface_distance`` per lung (the two metric classes
would each extract the same edges again; tests check equality with them).

Distances are in the units of ``spacing`` (pixels of the evaluated grid when
``spacing`` is None or 1.0; mm when the scan's pixel spacing is given).

Empty masks (a lung missing from the prediction, the gold mask, or both) are
handled explicitly, because MONAI returns ``nan``/``inf`` for them:

- both empty: a correct "nothing there" -> Dice 1, HD95 0, ASD 0;
- exactly one empty: Dice 0 (MONAI's value), and HD95 = ASD = the image
  diagonal in ``spacing`` units, the largest distance possible on that grid,
  so a missed lung is penalised as the worst case instead of being dropped
  (dropping it would reward a model for missing hard lungs).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

LUNG_CLASSES: tuple[int, ...] = (1, 2)
METRIC_NAMES: tuple[str, ...] = ("dice", "hd95", "asd")


def _one_hot(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """``(N, H, W)`` int -> ``(N, C, H, W)`` float one-hot."""
    t = torch.as_tensor(np.ascontiguousarray(labels), dtype=torch.long)
    return torch.nn.functional.one_hot(t, n_classes).permute(0, 3, 1, 2).float()


@dataclass
class SegmentationScores:
    """Per-image scores, each ``(N,)`` float64, averaged over the two lungs."""

    dice: np.ndarray
    hd95: np.ndarray
    asd: np.ndarray

    def mean(self, mask: np.ndarray | None = None) -> dict[str, float]:
        """Mean of each metric over all images, or over ``mask`` (bool ``(N,)``); nan if empty."""
        sel = np.ones(len(self.dice), bool) if mask is None else np.asarray(mask, bool)
        if not sel.any():
            return {k: float("nan") for k in METRIC_NAMES}
        return {k: float(getattr(self, k)[sel].mean()) for k in METRIC_NAMES}


def segmentation_scores(
    pred: np.ndarray,
    gold: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    classes: Sequence[int] = LUNG_CLASSES,
) -> SegmentationScores:
    """Dice, HD95 and ASD of label maps, per image, averaged over ``classes``.

    Args:
        pred: ``(N, H, W)`` or ``(H, W)`` integer labels (0 background, 1 right, 2 left lung).
        gold: same shape as ``pred``.
        spacing: pixel spacing, isotropic float or ``(row, col)``; None means 1 (pixels).
        classes: labels to score; background is never scored.

    Returns:
        :class:`SegmentationScores` with Dice in [0, 1] and distances in spacing units.
    """
    from monai.metrics import DiceMetric

    pred = np.asarray(pred)
    gold = np.asarray(gold)
    if pred.shape != gold.shape:
        raise ValueError(f"prediction shape {pred.shape} != gold shape {gold.shape}")
    if pred.ndim == 2:
        pred, gold = pred[None], gold[None]
    if pred.ndim != 3:
        raise ValueError(f"expected (N, H, W) or (H, W) label maps, got shape {pred.shape}")
    n_classes = int(max(max(classes), pred.max(initial=0), gold.max(initial=0))) + 1
    p, g = _one_hot(pred, n_classes), _one_hot(gold, n_classes)
    cls = list(classes)
    p, g = p[:, cls], g[:, cls]
    sp = (1.0, 1.0) if spacing is None else spacing
    sp = (float(sp), float(sp)) if np.isscalar(sp) else tuple(float(s) for s in sp)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask; handled below
        dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, g)
        dice = dice.detach().cpu().numpy().astype(np.float64)
        hd, asd = _surface_distances(p, g, sp)
    p_empty = p.sum(dim=(2, 3)).numpy() == 0
    g_empty = g.sum(dim=(2, 3)).numpy() == 0
    both = p_empty & g_empty
    one = p_empty ^ g_empty
    diagonal = float(np.hypot(pred.shape[1] * sp[0], pred.shape[2] * sp[1]))
    dice[both] = 1.0
    for d in (hd, asd):
        d[both] = 0.0
        d[one] = diagonal
        d[~np.isfinite(d)] = diagonal
    dice[one] = 0.0
    return SegmentationScores(dice=dice.mean(1), hd95=hd.mean(1), asd=asd.mean(1))


def _surface_distances(
    p: torch.Tensor, g: torch.Tensor, spacing: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """HD95 and symmetric ASD per ``(image, class)`` from one MONAI edge-distance pass.

    Same definitions as MONAI's ``HausdorffDistanceMetric(percentile=95)`` (max of the
    two directed 95th percentiles) and ``SurfaceDistanceMetric(symmetric=True)`` (mean
    of both directions' distances); computing the edges once halves the cost.
    Returns nan/inf where a mask is empty (fixed by the caller).
    """
    from monai.metrics.utils import get_edge_surface_distance

    n, c = p.shape[:2]
    hd = np.full((n, c), np.nan)
    asd = np.full((n, c), np.nan)
    for b, k in np.ndindex(n, c):
        _, dists, _ = get_edge_surface_distance(
            p[b, k], g[b, k], distance_metric="euclidean", spacing=spacing, symmetric=True,
            class_index=k, warn_empty=False,
        )
        if any(d.numel() == 0 for d in dists):
            continue
        hd[b, k] = max(float(torch.quantile(d.float(), 0.95)) for d in dists)
        asd[b, k] = float(torch.cat(dists).float().mean())
    return hd, asd


def dice_per_image(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Mean lung Dice per image ``(N,)`` in [0, 1] (MONAI), without distances: fast."""
    from monai.metrics import DiceMetric

    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.ndim == 2:
        pred, gold = pred[None], gold[None]
    p, g = _one_hot(pred, 3)[:, 1:], _one_hot(gold, 3)[:, 1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, g)
    return d.numpy().astype(np.float64).mean(1)
