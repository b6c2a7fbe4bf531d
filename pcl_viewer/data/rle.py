"""Run-length encoding of binary masks in the CheXmask convention.

CheXmask stores each organ as a string of ``"start length"`` pairs over the
mask flattened in row-major (C) order, with 1-indexed starts, plus the mask's
``Height`` and ``Width`` in separate columns. A two-lung label map (0
background, 1 right lung, 2 left lung) is stored as the two columns
``Right Lung`` and ``Left Lung``.
"""

from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> str:
    """RLE string of a binary ``(H, W)`` mask (nonzero = foreground); empty mask -> ``""``."""
    flat = np.asarray(mask).reshape(-1) != 0
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[::2], edges[1::2]
    pairs = np.stack([starts + 1, ends - starts], axis=1).reshape(-1)
    return " ".join(map(str, pairs.tolist()))


def decode(rle: str | float | None, height: int, width: int) -> np.ndarray:
    """Binary ``(height, width)`` uint8 0/1 mask of an RLE string (NaN/None/"" -> empty)."""
    out = np.zeros(height * width, dtype=np.uint8)
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return out.reshape(height, width)
    vals = np.asarray(str(rle).split(), dtype=np.int64)
    if vals.size % 2:
        raise ValueError("RLE must contain start/length pairs")
    starts, lengths = vals[0::2] - 1, vals[1::2]
    if vals.size and (starts.min() < 0 or (starts + lengths).max() > height * width):
        raise ValueError(f"RLE runs exceed a {height}x{width} mask")
    delta = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + lengths, -1)
    out[:] = np.cumsum(delta[:-1]) > 0
    return out.reshape(height, width)


def encode_lungs(labels: np.ndarray) -> tuple[str, str]:
    """``(Right Lung, Left Lung)`` RLE strings of a 0/1/2 label map."""
    return encode(labels == 1), encode(labels == 2)


def decode_lungs(right: str | float | None, left: str | float | None,
                 height: int, width: int) -> np.ndarray:
    """0/1/2 ``(H, W)`` uint8 label map from the two lung RLE strings."""
    lab = decode(right, height, width)
    lab[decode(left, height, width) > 0] = 2
    return lab
