"""Native scan <-> model tensor geometry.

A native ``(H, W)`` scan is padded to a square (centred, with its edge-mean
intensity) and resized to the model size ``S``. :class:`Geometry` remembers
how, so model-size outputs map back to the native grid: residuals and
feature overlays bilinearly or by nearest neighbour, labels by nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Geometry:
    """How a native ``(H, W)`` image was mapped to an ``S x S`` model grid."""

    native_shape: tuple[int, int]
    size: int
    pad_top: int
    pad_left: int
    side: int  # side of the padded square, in native pixels

    def to_native(self, arr: np.ndarray, nearest: bool = False) -> np.ndarray:
        """Map ``(S, S)`` or ``(S, S, C)`` at model size back to ``(H, W[, C])`` native."""
        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        a = np.ascontiguousarray(arr)
        dtype = a.dtype
        if a.dtype == np.bool_ or (a.dtype.kind in "iu" and a.dtype.itemsize > 2):
            a = a.astype(np.uint16 if a.max(initial=0) > 255 else np.uint8)
        up = cv2.resize(a, (self.side, self.side), interpolation=interp)
        h, w = self.native_shape
        out = up[self.pad_top : self.pad_top + h, self.pad_left : self.pad_left + w]
        return out.astype(dtype, copy=False)


def to_model(image: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """``(H, W)`` float32 [0, 1] -> ``(size, size)`` float32 and its :class:`Geometry`.

    Downsampling uses area interpolation (anti-aliased), upsampling bilinear.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if h != w:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        square = np.full((side, side), float(border.mean()), dtype=np.float32)
        square[top : top + h, left : left + w] = image
    else:
        square = image.astype(np.float32, copy=False)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    small = cv2.resize(square, (size, size), interpolation=interp)
    return np.clip(small, 0.0, 1.0).astype(np.float32), Geometry((h, w), size, top, left, side)
