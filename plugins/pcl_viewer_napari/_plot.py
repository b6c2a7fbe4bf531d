"""The CHRO-map embedding panel: all views' pixels in the shared unit disc.

The picture is rasterised with numpy (a few ms) and shown as a pixmap. A matplotlib
figure here cost ~300 ms of the Qt thread at the end of every run (artists rebuilt,
then an Agg draw), which froze the window on a 2-core machine.
"""

from __future__ import annotations

import html
from functools import lru_cache

import numpy as np
from qtpy.QtCore import Qt, Signal
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


def to_pixel(points: np.ndarray, size: int) -> np.ndarray:
    """``(N, 2)`` unit-disc x, y -> ``(N, 2)`` picture row, column (as :func:`render_embedding`)."""
    scale = (size - 2) / (2 * EXTENT)
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return np.stack([(EXTENT - p[:, 1]) * scale, (p[:, 0] + EXTENT) * scale], -1)


def to_disc(row: float, col: float, size: int) -> tuple[float, float]:
    """Picture row, column -> unit-disc x, y (inverse of :func:`to_pixel`)."""
    scale = (size - 2) / (2 * EXTENT)
    return col / scale - EXTENT, EXTENT - row / scale


def draw_marks(img: np.ndarray, points: np.ndarray | None,
               box: tuple[tuple[float, float], tuple[float, float]] | None) -> np.ndarray:
    """A copy of the plot ``img`` with a white cross on each point and the brushed box."""
    out = img.copy()
    size = img.shape[0]
    if points is not None:
        for r, c in to_pixel(points, size).round().astype(int):
            out[max(r - 5, 0) : r + 6, min(max(c, 0), size - 1)] = (255, 255, 255)
            out[min(max(r, 0), size - 1), max(c - 5, 0) : c + 6] = (255, 255, 255)
    if box is not None:
        (r0, c0), (r1, c1) = to_pixel(np.array(box), size).round().astype(int).clip(0, size - 1)
        r0, r1, c0, c1 = min(r0, r1), max(r0, r1), min(c0, c1), max(c0, c1)
        out[[r0, r1], c0 : c1 + 1] = (255, 255, 255)
        out[r0 : r1 + 1, [c0, c1]] = (255, 255, 255)
    return out


class EmbeddingPlot(QWidget):
    """2-D embedding of every pixel of every view, one dot colour per view, with a legend.

    Dragging a box on the picture emits ``brushed(lo, hi)`` (unit-disc x, y corners);
    :meth:`mark` draws crosses on points (e.g. the pixel clicked in a view).
    """

    brushed = Signal(tuple, tuple)

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
        self.marked: np.ndarray | None = None  # (k, 2) unit-disc points marked, or None
        self.box: tuple | None = None
        self._press: tuple[float, float] | None = None
        self.image.mousePressEvent = self._on_press
        self.image.mouseReleaseEvent = self._on_release
        self.clear()

    def _disc_at(self, event) -> tuple[float, float] | None:
        if self.pixels is None:
            return None
        pos = event.position() if hasattr(event, "position") else event.pos()
        size = self.pixels.shape[0]
        col = pos.x() - (self.image.width() - size) / 2
        row = pos.y() - (self.image.height() - size) / 2
        return to_disc(row, col, size)

    def _on_press(self, event) -> None:
        self._press = self._disc_at(event)

    def _on_release(self, event) -> None:
        start, end = self._press, self._disc_at(event)
        self._press = None
        if start is not None and end is not None and start != end:
            self.brushed.emit(tuple(start), tuple(end))

    def mark(self, points: np.ndarray | None = None, box=None) -> None:
        """Cross each ``(k, 2)`` unit-disc point and outline ``box`` (lo, hi) on the plot."""
        self.marked = None if points is None else np.asarray(points).reshape(-1, 2)
        self.box = box
        if self.pixels is not None:
            self._show(draw_marks(self.pixels, self.marked, box))

    def _show(self, pixels: np.ndarray) -> None:
        h, w, _ = pixels.shape
        pixels = np.ascontiguousarray(pixels)
        qimage = QImage(pixels.data, w, h, 3 * w, QImage.Format.Format_RGB888)
        self.image.setPixmap(QPixmap.fromImage(qimage))  # copies the pixels

    def clear(self, message: str = "CHRO-map embedding: run Segment") -> None:
        self.pixels = None
        self.marked = self.box = None
        self.image.clear()
        self.image.setText(f'<span style="color:#aaaaaa">{html.escape(message)}</span>')
        self.legend.setText("")

    def show_result(self, result: PipelineResult, seed: int = 0) -> None:
        if result.chromap is None:
            self.clear()
            return
        self.pixels = render_embedding(result.embedding, result.embedding_labels,
                                       self.size_px, seed=seed)
        self.marked = self.box = None
        self._show(self.pixels)
        entries = [f'<span style="color:{VIEW_COLOURS[v % len(VIEW_COLOURS)]}">&#9679;</span>'
                   f"&nbsp;{html.escape(key)}" for v, key in enumerate(result.views)]
        self.legend.setText(f'<span style="color:#aaaaaa">{html.escape(str(result.reducer))}'
                            "</span>&nbsp;&nbsp; " + "&nbsp;&nbsp; ".join(entries))
