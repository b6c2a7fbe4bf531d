"""The CHRO-map embedding panel: all views' pixels in the shared unit disc (matplotlib in Qt)."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QVBoxLayout, QWidget

from pcl_viewer.pipeline import PipelineResult

MAX_POINTS = 4000


def _disc_background(n: int = 128) -> np.ndarray:
    """``(n, n, 4)`` polar-HSV colour wheel of the unit disc (the CHRO-map colour frame)."""
    from matplotlib.colors import hsv_to_rgb

    yy, xx = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    hue = (np.arctan2(yy, xx) / (2 * np.pi)) % 1.0
    rad = np.hypot(xx, yy)
    rgb = hsv_to_rgb(np.stack([hue, np.clip(rad, 0, 1), np.ones_like(rad)], -1))
    alpha = np.where(rad <= 1.0, 0.35, 0.0)[..., None]
    return np.concatenate([rgb, alpha], -1)


class EmbeddingPlot(QWidget):
    """2-D embedding of every pixel of every view, one marker colour per view."""

    def __init__(self, parent: QWidget | None = None, height: int = 250) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3, 3), dpi=80, facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(height)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.ax = self.figure.add_axes((0.02, 0.16, 0.96, 0.82))
        self.clear()

    def clear(self, message: str = "CHRO-map embedding: run Segment") -> None:
        self.ax.clear()
        self.ax.set_axis_off()
        self.ax.text(0.5, 0.5, message, color="#aaaaaa", ha="center", va="center",
                     transform=self.ax.transAxes, fontsize=9)
        self.canvas.draw_idle()

    def show_result(self, result: PipelineResult, seed: int = 0) -> None:
        if result.chromap is None:
            self.clear()
            return
        emb, lab = result.embedding, result.embedding_labels
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(emb), size=min(MAX_POINTS, len(emb)), replace=False)
        ax = self.ax
        ax.clear()
        ax.imshow(_disc_background(), extent=(-1, 1, -1, 1), origin="lower", zorder=0)
        t = np.linspace(0, 2 * np.pi, 200)
        ax.plot(np.cos(t), np.sin(t), color="#cccccc", lw=0.8)
        import matplotlib

        colours = np.asarray(matplotlib.colormaps["tab10"].colors)
        names = list(result.views)
        order = rng.permutation(idx)  # interleave the views: none hides the others
        ax.scatter(emb[order, 0], emb[order, 1], s=3, alpha=0.6, linewidths=0,
                   c=colours[lab[order] % 10])
        for v, key in enumerate(names):  # legend entries only
            ax.scatter([], [], s=12, color=colours[v % 10], label=key)
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=4, fontsize=8,
                  frameon=False, markerscale=3, labelcolor="#dddddd", handletextpad=0.1,
                  columnspacing=0.8)
        ax.text(-1.05, 1.0, result.reducer, color="#aaaaaa", fontsize=8, va="top")
        self.canvas.draw_idle()
