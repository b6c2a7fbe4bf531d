"""The one lung colour scheme of the project: app layers, review thumbnails and figures.

Label values everywhere: 0 background, 1 right lung (image left in a PA view),
2 left lung. Blue and amber stay distinct for the common colour-vision deficiencies
(Okabe-Ito-like hues) and on both dark (napari) and light (HTML report) backgrounds.
"""

from __future__ import annotations

import numpy as np

RIGHT_LUNG = "#1f9bff"
LEFT_LUNG = "#ffb000"
# index = label value; "transparent" for the background (napari label colormap order)
LUNG_COLOURS: tuple[str, str, str] = ("transparent", RIGHT_LUNG, LEFT_LUNG)
LUNG_NAMES: dict[int, str] = {1: "right lung", 2: "left lung"}


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` -> ``(r, g, b)`` in 0..255."""
    h = colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def lung_rgb() -> np.ndarray:
    """``(3, 3)`` uint8 RGB per label value (row 0, the background, is black)."""
    return np.array([(0, 0, 0), hex_to_rgb(RIGHT_LUNG), hex_to_rgb(LEFT_LUNG)], np.uint8)


def overlay_lungs(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey ``image`` (H, W) float [0, 1] with ``labels`` (H, W) uint8 blended in the lung
    colours; returns (H, W, 3) uint8 (background pixels keep the grey value)."""
    grey = np.clip(np.asarray(image, np.float32), 0, 1)[..., None] * 255.0
    rgb = np.repeat(grey, 3, axis=-1)
    lab = np.asarray(labels)
    colours = lung_rgb().astype(np.float32)
    for value in LUNG_NAMES:
        m = lab == value
        rgb[m] = (1 - alpha) * rgb[m] + alpha * colours[value]
    return rgb.round().astype(np.uint8)


def legend_html() -> str:
    """An inline HTML legend of the lung colours (for Qt labels and the HTML report)."""
    items = [f'<span style="color:{c}">&#9632;</span>&nbsp;{LUNG_NAMES[v]}'
             for v, c in ((1, RIGHT_LUNG), (2, LEFT_LUNG))]
    return "&nbsp;&nbsp;".join(items)
