"""The CHRO-map embedding panel: all views' pixels in the shared unit disc.

The picture is rasterised with numpy (a few ms) and shown as a pixmap. A matplotlib
figure here cost ~300 ms of the Qt thread at the end of every run (artists rebuilt,
then an Agg draw), which froze the window on a 2-core machine.
"""

from __future__ import annotations

import html
from functools import lru_cache

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from pcl_viewer.pipeline import PipelineResult

MAX_POINTS = 4000
EXTENT = 1.05  # the picture spans [-EXTENT, EXTENT] on both axes
BACKGROUND = (0x26, 0x29, 0x30)  # napari's dark panel colour
CIRCLE = (0xCC, 0xCC, 0xCC)
DISC_ALPHA = 0.35  # the colour wheel behind the points
POINT_ALPHA = 0.6
# matplotlib's tab10: one colour per view
VIEW_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22", "#17becf")


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns ``(..., 3)``."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros((*h.shape, 3), np.float64)
    for k, (r, g, b) in enumerate(choices):
        m = i == k
        out[m] = np.stack([r[m], g[m], b[m]], -1)
    return out


@lru_cache(maxsize=4)
def _disc_background(size: int) -> np.ndarray:
    img = disc_background(size)
    img.setflags(write=False)
    return img


def disc_background(size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8: the polar-HSV colour wheel of the unit disc (the CHRO-map
    colour frame: hue = angle, saturation = radius) over the panel colour, with its rim."""
    c = np.linspace(-EXTENT, EXTENT, size)
    xx, yy = np.meshgrid(c, c[::-1])  # row 0 at the top: y up
    rad = np.hypot(xx, yy)
    hue = (np.arctan2(yy, xx) / (2 * np.pi)) % 1.0
    wheel = 255.0 * _hsv_to_rgb(hue, np.clip(rad, 0, 1), np.ones_like(rad))
    bg = np.broadcast_to(np.asarray(BACKGROUND, np.float64), wheel.shape)
    inside = (rad <= 1.0)[..., None]
    img = np.where(inside, (1 - DISC_ALPHA) * bg + DISC_ALPHA * wheel, bg)
    pixel = 2 * EXTENT / (size - 1)
    img[np.abs(rad - 1.0) < 0.6 * pixel] = CIRCLE
    return img.round().astype(np.uint8)


def render_embedding(embedding: np.ndarray, labels: np.ndarray, size: int = 240,
                     max_points: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """``(size, size, 3)`` uint8 picture of the embedding: a 2 x 2 px dot per point (a random
    subset of ``max_points``, views interleaved so that none hides the others), coloured
    by its view (``labels``: view index), over :func:`disc_background`."""
    img = _disc_background(size).copy()
    if len(embedding) == 0:
        return img
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(embedding), size=min(max_points, len(embedding)), replace=False)
    idx = rng.permutation(idx)
    scale = (size - 2) / (2 * EXTENT)
    col = np.clip(((embedding[idx, 0] + EXTENT) * scale).astype(np.int64), 0, size - 2)
    row = np.clip(((EXTENT - embedding[idx, 1]) * scale).astype(np.int64), 0, size - 2)
    palette = np.array([_rgb(c) for c in VIEW_COLOURS], np.float64)
    colour = palette[np.asarray(labels)[idx] % len(VIEW_COLOURS)]
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = row + dr, col + dc
            under = img[r, c].astype(np.float64)
            img[r, c] = ((1 - POINT_ALPHA) * under + POINT_ALPHA * colour).round().astype(np.uint8)
    return img


class EmbeddingPlot(QWidget):
    """2-D embedding of every pixel of every view, one dot colour per view, with a legend."""

    def __init__(self, parent: QWidget | None = None, height: int = 250) -> None:
        super().__init__(parent)
        self.size_px = max(64, height - 30)
        self.image = QLabel(alignment=Qt.AlignmentFlag.AlignCenter)
        self.image.setMinimumHeight(self.size_px)
        self.legend = QLabel(alignment=Qt.AlignmentFlag.AlignCenter, wordWrap=True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addWidget(self.image)
        lay.addWidget(self.legend)
        self.pixels: np.ndarray | None = None  # the picture shown, (size, size, 3) uint8
        self.clear()

    def clear(self, message: str = "CHRO-map embedding: run Segment") -> None:
        self.pixels = None
        self.image.clear()
        self.image.setText(f'<span style="color:#aaaaaa">{html.escape(message)}</span>')
        self.legend.setText("")

    def show_result(self, result: PipelineResult, seed: int = 0) -> None:
        if result.chromap is None:
            self.clear()
            return
        self.pixels = render_embedding(result.embedding, result.embedding_labels,
                                       self.size_px, seed=seed)
        h, w, _ = self.pixels.shape
        qimage = QImage(self.pixels.data, w, h, 3 * w, QImage.Format.Format_RGB888)
        self.image.setPixmap(QPixmap.fromImage(qimage))  # copies the pixels
        entries = [f'<span style="color:{VIEW_COLOURS[v % len(VIEW_COLOURS)]}">&#9679;</span>'
                   f"&nbsp;{html.escape(key)}" for v, key in enumerate(result.views)]
        self.legend.setText(f'<span style="color:#aaaaaa">{html.escape(str(result.reducer))}'
                            "</span>&nbsp;&nbsp; " + "&nbsp;&nbsp; ".join(entries))
