"""Lung segmentation of scans of any size: the one implementation every path calls.

:class:`pcl_viewer.pipeline.Pipeline` (viewer, ``pcl review``, ``pcl segment``,
``pcl chromap``) and :func:`pcl_viewer.evaluate.phantom_eval.segment_image`
(``pcl evaluate``, the shipped model's card) all segment through
:func:`segment_batch`: each scan is mapped to the U-Net's grid (:func:`to_model`), the
U-Net gives decoder features and logits, the argmax goes back to the scan's native size
by nearest-neighbour resizing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pcl_viewer.data.preprocess import Geometry, to_model

if TYPE_CHECKING:
    import torch

    from pcl_viewer.models.unet import DenseUNet


@dataclass(frozen=True)
class Segmentation:
    """The U-Net's output for a batch of scans.

    Attributes:
        labels: per scan ``(H, W)`` uint8 at its native size (0 background, 1 right lung,
            2 left lung).
        classes: ``(N, S, S)`` uint8, the same labels on the model grid.
        features: ``(N, C, S, S)`` float32 decoder features (what CHRO-maps embed).
        geometries: per scan, how it was mapped to the model grid.
    """

    labels: list[np.ndarray]
    classes: np.ndarray
    features: np.ndarray
    geometries: list[Geometry]


def segment_batch(net: DenseUNet, images: Sequence[np.ndarray], size: int,
                  device: str | torch.device = "cpu") -> Segmentation:
    """Segment ``(H, W)`` float32 [0, 1] scans (any sizes) in one batch.

    ``net`` is a :class:`~pcl_viewer.models.unet.DenseUNet` (``features`` then
    ``seg_head``: its ``forward``) in eval mode on ``device``; ``size`` its input side.
    """
    import torch

    prepared = [to_model(np.asarray(im), size) for im in images]
    x = np.ascontiguousarray(np.stack([p[0] for p in prepared]), dtype=np.float32)[:, None]
    with torch.inference_mode():
        feats = net.features(torch.as_tensor(x, device=device))
        classes = net.seg_head(feats).argmax(1).to(torch.uint8).cpu().numpy()
        features = feats.float().cpu().numpy()
    geometries = [geo for _, geo in prepared]
    labels = [geo.to_native(lab, nearest=True) for geo, lab in zip(geometries, classes)]
    return Segmentation(labels, classes, features, geometries)
