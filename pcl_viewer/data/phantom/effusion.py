"""Pleural effusion geometry: fluid at the lung base with a meniscus rising laterally.

The fluid of one side fills the lung below a concave upper border
``y_top(x) = y_cp - h * (m0 + (1 - m0) * lat(x) ** k)``, where ``y_cp`` is the
lateral costophrenic angle, ``lat`` the lateralness in [0, 1] across the lung
and ``h`` grows with severity. A small effusion only blunts the costophrenic
angle; a large one opacifies most of the hemithorax. The fluid's top fades
over a short distance (thin fluid layer), and it replaces aerated lung: the
gold mask loses the pixels where the fluid weight exceeds 0.5.
"""

from __future__ import annotations

import numpy as np

from pcl_viewer.data.phantom.noise import EffusionNoise
from pcl_viewer.data.phantom.shape import SEGMENTS


def fluid_sides(noise: EffusionNoise) -> dict[str, float]:
    """Severity per affected side (``right``/``left``); bilateral effusions are smaller."""
    if noise.side == "bilateral":
        return {"right": 0.75 * noise.severity, "left": 0.65 * noise.severity}
    return {noise.side: noise.severity}


def fluid_weight(lung: np.ndarray, side: str, severity: float, meniscus: float,
                 xs: np.ndarray, ys: np.ndarray, realistic: bool = False) -> np.ndarray:
    """Fluid fraction ``(S, S)`` float32 in [0, 1] on the grid ``xs`` (S,) x ``ys`` (S,).

    Not yet restricted to the lung: the caller multiplies by the lung's raster.

    Args:
        lung: ``(N, 2)`` landmarks of the lung (body frame, normalised).
        side: ``right`` (image left) or ``left`` (image right).
        severity: [0, 1].
        meniscus: standard normal; larger = sharper lateral rise.
        realistic: fluid height up to 0.9 of the lung height (severity linear), else the
            earlier, smaller range.
    """
    cp = lung[SEGMENTS[0]]
    medial_base = lung[SEGMENTS[0] + SEGMENTS[1]]
    top, bottom = lung[:, 1].min(), lung[:, 1].max()
    height = bottom - top
    y_cp = max(cp[1], bottom - 0.01)
    h = height * (0.10 + 0.75 * severity**1.1) if realistic is False else \
        height * (0.05 + 0.85 * severity)
    x_lat, x_med = cp[0], medial_base[0]
    lat = np.clip((xs - x_med) / (x_lat - x_med), 0.0, 1.0)
    k = 2.4 + 0.6 * np.tanh(meniscus)
    m0 = 0.25 + 0.2 * severity
    # concave meniscus, plus a thin layer climbing the lateral chest wall
    y_top = y_cp - h * (m0 + (1.0 - m0) * lat**k) - 0.35 * h * np.exp(-(1.0 - lat) / 0.05)
    # the fluid thins towards its upper edge: a wide ramp in the realistic regime, so the
    # border of the aerated lung is a soft, low-contrast meniscus (labels are uncertain
    # there, as on real films)
    fade = 0.09 + 0.09 * severity if realistic else 0.02 + 0.025 * severity
    w = np.clip((ys[:, None] - y_top[None, :]) / fade + 0.3, 0.0, 1.0)
    return w.astype(np.float32)


def layering_weight(lung: np.ndarray, severity: float, ys: np.ndarray) -> np.ndarray:
    """Fluid fraction ``(S, 1)`` of a layering effusion (no meniscus) on rows ``ys`` (S,).

    The fluid lies behind the lung, so it veils the whole lung field as a haze that
    thickens towards the base; only a large one exceeds half the depth at the base
    (where the gold mask loses lung). Not restricted to the lung (the caller masks it).
    """
    top, bottom = lung[:, 1].min(), lung[:, 1].max()
    t = np.clip((ys - top) / max(bottom - top, 1e-6), 0.0, 1.0)
    amp = 0.45 + 0.6 * severity
    w = np.clip(amp * t ** (2.5 - 1.2 * severity), 0.0, 1.0)
    # the posterior costophrenic recess fills first: a denser band at the very base
    w = np.maximum(w, np.clip((t - (0.93 - 0.25 * severity)) / 0.06, 0.0, 1.0) * 0.95)
    return w[:, None].astype(np.float32)
