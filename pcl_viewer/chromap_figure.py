"""The reference CHRO-map figure: the 2-D embedding beside the CHRO-maps of every view.

Left: the reducer-plane points of all views, coloured by predicted class, with
the enclosing ellipse. Right: one column per view, the grey view on top and its
CHRO-map overlay below. Drawn with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pcl_viewer.chromap import ChroMap
from pcl_viewer.colors import LEFT_LUNG, RIGHT_LUNG
from pcl_viewer.data.preprocess import Geometry
from pcl_viewer.figures import save_figure

CLASS_NAMES: tuple[str, ...] = ("background", "right lung", "left lung")
# the project's one lung colour scheme (pcl_viewer.colors); grey for the background
CLASS_COLOURS: tuple[str, ...] = ("#9e9e9e", RIGHT_LUNG, LEFT_LUNG)


def labels_on_model_grid(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Native ``(H, W)`` labels sampled at the centres of the ``(S, S)`` model grid -> ``(S, S)`` uint8.

    Model pixels that fall in the square padding get class 0.
    """
    s, side = geometry.size, geometry.side
    centres = (np.arange(s) + 0.5) * side / s
    rows = np.floor(centres - geometry.pad_top).astype(int)
    cols = np.floor(centres - geometry.pad_left).astype(int)
    h, w = labels.shape
    inside = (rows[:, None] >= 0) & (rows[:, None] < h) & (cols[None] >= 0) & (cols[None] < w)
    out = labels[np.clip(rows, 0, h - 1)][:, np.clip(cols, 0, w - 1)].astype(np.uint8)
    return np.where(inside, out, 0).astype(np.uint8)


def draw_chromap_figure(chromap: ChroMap, images: list[np.ndarray], names: list[str],
                        out: str | os.PathLike, classes: np.ndarray | None = None,
                        alpha: float = 0.5, mode: str = "blend", title: str = "",
                        max_points: int = 20_000, seed: int = 0) -> Path:
    """Write the figure as PNG (atomically) and return its path.

    Args:
        chromap: fitted on the ``V`` views, in the order of ``images``.
        images: ``V`` native ``(H, W)`` float32 [0, 1] views.
        names: ``V`` column titles.
        classes: ``(V, h, w)`` uint8 predicted class per feature pixel, or None
            (then points are coloured by their CHRO-map colour).
        max_points: embedding points drawn (seeded subsample), to keep the file small.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    v = chromap.n_views
    if len(images) != v or len(names) != v:
        raise ValueError(f"{v} views in the CHRO-map but {len(images)} images and {len(names)} names")
    fig = plt.figure(figsize=(3.2 * (v + 1.3), 6.4), dpi=120)
    grid = fig.add_gridspec(2, v + 1, width_ratios=[1.3] + [1] * v)
    ax = fig.add_subplot(grid[:, 0])
    _draw_embedding(ax, chromap, classes, max_points, seed)
    for i, (img, name) in enumerate(zip(images, names)):
        top, bottom = fig.add_subplot(grid[0, i + 1]), fig.add_subplot(grid[1, i + 1])
        top.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="antialiased")
        bottom.imshow(chromap.overlay(i, img, alpha=alpha, mode=mode), interpolation="antialiased")
        top.set_title(name, fontsize=9)
        for a in (top, bottom):
            a.set_xticks([])
            a.set_yticks([])
    fig.axes[2].set_ylabel("CHRO-map", fontsize=9)
    fig.axes[1].set_ylabel("view", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(out))


def _draw_embedding(ax, chromap: ChroMap, classes: np.ndarray | None, max_points: int,
                    seed: int) -> None:
    pts = chromap.plane
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(pts), size=min(max_points, len(pts)), replace=False))
    if classes is not None:
        cls = np.asarray(classes).reshape(-1)[pick]
        for k, (name, colour) in enumerate(zip(CLASS_NAMES, CLASS_COLOURS)):
            sel = cls == k
            if sel.any():
                ax.scatter(pts[pick][sel, 0], pts[pick][sel, 1], s=1.5, c=colour, label=name,
                           alpha=0.6, linewidths=0, rasterized=True)
        ax.legend(loc="upper right", fontsize=8, markerscale=6, frameon=False)
    else:
        colours = chromap.view_rgb.reshape(-1, 3)[pick] / 255.0
        ax.scatter(pts[pick, 0], pts[pick, 1], s=1.5, c=colours, linewidths=0, rasterized=True)
    ring = chromap.frame.ellipse.outline(256)
    ax.plot(ring[:, 0], ring[:, 1], "k-", lw=1.0)
    ax.plot(*chromap.frame.ellipse.centre, "k+", ms=8)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title("2-D embedding of all views\n(predicted class, enclosing ellipse)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, out: Path) -> Path:
    return save_figure(fig, out, format="png")
