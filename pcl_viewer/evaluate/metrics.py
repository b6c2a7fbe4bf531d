"""Segmentation metrics of the benchmark, computed by MONAI.

Dice, 95th-percentile Hausdorff distance (HD95) and average symmetric surface
distance (ASD) over the two lung classes (labels 1 and 2; background is not
scored), per image, then averaged over the two lungs. Dice is MONAI's
``compute_dice`` (:func:`dice_scores`); HD95 and ASD are MONAI's ``HausdorffDistanceMetric(percentile=95)``
and ``SurfaceDistanceMetric(symmetric=True)`` definitions computed from one
call of MONAI's ``get_edge_surface_distance`` per lung (the two metric classes
would each extract the same edges again; tests check equality with them).

:func:`dice_scores` is the project's one Dice (MONAI's ``compute_dice``): the
benchmark metrics here, the silver-label quality and report
(:mod:`pcl_viewer.data.phantom.silver`) and the pre-training linear probe
(:mod:`pcl_viewer.train.probe`) all call it, each with its documented empty-mask
convention and precision (the pipeline's consistency Dice in
``pcl_viewer/pipeline.py`` is a separate confusion-matrix version, not folded yet).
Importing this module is cheap (NumPy only); torch and MONAI load on first use.

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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch and MONAI are imported where used: importing this module is cheap
    import torch

LUNG_CLASSES: tuple[int, ...] = (1, 2)
METRIC_NAMES: tuple[str, ...] = ("dice", "hd95", "asd")
_DICE_CHUNK = 128  # images per MONAI call in dice_scores (memory: 128 x 3 x H x W floats)


def _one_hot(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """``(N, H, W)`` int -> ``(N, C, H, W)`` float one-hot."""
    import torch

    t = torch.as_tensor(np.ascontiguousarray(labels), dtype=torch.long)
    return torch.nn.functional.one_hot(t, n_classes).permute(0, 3, 1, 2).float()


def _labels(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A label map as a CPU torch tensor (no copy for a CPU tensor or an integer array)."""
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    return torch.as_tensor(np.ascontiguousarray(a))


def _batch_of_maps(pred: Any, gold: Any) -> tuple[Any, Any]:
    """``pred`` and ``gold`` (NumPy arrays or tensors) as ``(N, H, W)`` batches; ValueError
    when their shapes differ or are neither ``(N, H, W)`` nor ``(H, W)``."""
    if pred.shape != gold.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != gold shape {tuple(gold.shape)}")
    if pred.ndim == 2:
        pred, gold = pred[None], gold[None]
    if pred.ndim != 3:
        raise ValueError(f"expected (N, H, W) or (H, W) label maps, got shape {tuple(pred.shape)}")
    return pred, gold


def dice_scores(
    pred: np.ndarray | torch.Tensor,
    gold: np.ndarray | torch.Tensor,
    classes: Sequence[int] = LUNG_CLASSES,
    both_empty: float = 1.0,
    dtype: str = "float32",
) -> np.ndarray:
    """Dice per image and class of label maps: the project's one Dice (MONAI).

    ``Dice = 2 |P & G| / (|P| + |G|)`` for each class ``c`` (``P = pred == c``,
    ``G = gold == c``), computed by MONAI's ``compute_dice`` (``ignore_empty=False``).
    Conventions for empty masks, shared by every caller:

    - a class absent from the prediction but present in the gold mask, or the other
      way round: Dice 0 (MONAI's value; a missed or invented lung is a full miss);
    - a class absent from both: ``both_empty``. The benchmark metrics and the silver
      labels use 1.0 (a correct "nothing there"); the linear probe uses NaN (no
      evidence: the image is left out of that class's ``nanmean``).

    Args:
        pred: ``(N, H, W)`` or ``(H, W)`` integer labels (NumPy or torch, any device).
        gold: same shape as ``pred``.
        classes: labels to score (default the two lungs, 1 and 2).
        both_empty: the value for a class absent from both maps (1.0 or NaN).
        dtype: "float32" (MONAI's usual precision; the benchmark and probe numbers) or
            "float64" (the silver labels' numbers). Both are the exactly rounded value
            of the ratio of pixel counts in that precision.

    Returns:
        ``(N, len(classes))`` array of ``dtype``, in [0, 1] (or ``both_empty``).

    Raises:
        ValueError: shapes differ or are not ``(N, H, W)`` / ``(H, W)``; unknown dtype.
    """
    import torch
    from monai.metrics import compute_dice

    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    p, g = _batch_of_maps(_labels(pred), _labels(gold))
    cls = torch.as_tensor(list(classes), dtype=torch.long)[None, :, None, None]
    tdtype = getattr(torch, dtype)
    out = np.empty((p.shape[0], cls.shape[1]), dtype)
    for s in range(0, p.shape[0], _DICE_CHUNK):  # bounded memory; images are independent
        pc, gc = p[s : s + _DICE_CHUNK], g[s : s + _DICE_CHUNK]
        pad = torch.zeros(pc.shape[0], 1, *pc.shape[1:], dtype=torch.bool)
        # (n, 1 + C, H, W): channel 0 is a placeholder MONAI skips (include_background=
        # False); it keeps MONAI's channel loop right for a single class. The gold
        # channels carry the precision: MONAI sums them in their dtype.
        p1 = torch.cat([pad, pc[:, None] == cls], 1)
        g1 = torch.cat([pad, gc[:, None] == cls], 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on empty masks; handled here
            d = compute_dice(p1, g1.to(tdtype), include_background=False, ignore_empty=False)
        d = d.to(tdtype).numpy()
        d[~(p1[:, 1:].flatten(2).any(2) | g1[:, 1:].flatten(2).any(2)).numpy()] = both_empty
        out[s : s + len(d)] = d
    return out


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
        :class:`SegmentationScores` with Dice in [0, 1] (:func:`dice_scores`, float32,
        both-empty 1) and distances in spacing units.
    """
    pred, gold = _batch_of_maps(np.asarray(pred), np.asarray(gold))
    n_classes = int(max(max(classes), pred.max(initial=0), gold.max(initial=0))) + 1
    p, g = _one_hot(pred, n_classes), _one_hot(gold, n_classes)
    cls = list(classes)
    p, g = p[:, cls], g[:, cls]
    sp = (1.0, 1.0) if spacing is None else spacing
    sp = (float(sp), float(sp)) if np.isscalar(sp) else tuple(float(s) for s in sp)

    dice = dice_scores(pred, gold, cls, both_empty=1.0).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask; handled below
        hd, asd = _surface_distances(p, g, sp)
    p_empty = p.sum(dim=(2, 3)).numpy() == 0
    g_empty = g.sum(dim=(2, 3)).numpy() == 0
    both = p_empty & g_empty
    one = p_empty ^ g_empty
    diagonal = float(np.hypot(pred.shape[1] * sp[0], pred.shape[2] * sp[1]))
    for d in (hd, asd):
        d[both] = 0.0
        d[one] = diagonal
        d[~np.isfinite(d)] = diagonal
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
    import torch
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
    """Mean lung Dice per image ``(N,)`` float64 in [0, 1], without distances: fast.

    ``pred``, ``gold``: ``(N, H, W)`` or ``(H, W)`` labels. The Dice of
    :func:`segmentation_scores` (:func:`dice_scores`, float32, both-empty 1).
    """
    return dice_scores(pred, gold, LUNG_CLASSES, both_empty=1.0).astype(np.float64).mean(1)
