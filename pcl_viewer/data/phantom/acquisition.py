"""Acquisition mechanisms: pose, detector noise, tone curve, MTF, edge enhancement,
collimation and burned-in markers, per scanner style.

``philips`` and ``imagingdynamics`` are the two PadChest manufacturers; the
held-out ``portable`` style imitates a bedside AP study (low contrast, more
noise, blur, tilt, magnified heart — see :mod:`.anatomy` — and lines/tubes).
All functions take and return ``(S, S)`` float32 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from pcl_viewer.data.phantom.noise import StudyNoise


@dataclass(frozen=True)
class Style:
    """Parameters of one acquisition chain (fractions are of the image size)."""

    window: tuple[float, float]  # attenuation mapped to [0, 1] before the tone curve
    contrast: float  # slope of the sigmoid tone curve
    centre: float  # sigmoid centre in windowed units
    gamma: float
    noise: float  # quantum noise sigma (display units at mid-grey)
    noise_corr: float  # noise correlation length (fraction of size)
    blur: float  # MTF gaussian sigma (fraction of size)
    edge_amount: float  # unsharp-mask gain
    edge_radius: float  # unsharp-mask radius (fraction of size)
    collimation: tuple[float, float]  # margin range (fraction of size)
    collimation_value: float
    rotation_deg: float  # sd of patient rotation
    magnification: float
    grid_lines: float  # amplitude of anti-scatter grid lines


STYLES: dict[str, Style] = {
    "philips": Style(window=(-0.05, 1.30), contrast=5.0, centre=0.50, gamma=1.0,
                     noise=0.010, noise_corr=0.0, blur=0.0022, edge_amount=0.35,
                     edge_radius=0.03, collimation=(0.0, 0.035), collimation_value=0.02,
                     rotation_deg=1.2, magnification=1.0, grid_lines=0.0),
    "imagingdynamics": Style(window=(-0.10, 1.45), contrast=3.6, centre=0.46, gamma=0.78,
                             noise=0.011, noise_corr=0.003, blur=0.0035, edge_amount=1.1,
                             edge_radius=0.008, collimation=(0.02, 0.075),
                             collimation_value=0.80, rotation_deg=1.2, magnification=1.0,
                             grid_lines=0.012),
    "portable": Style(window=(-0.15, 1.70), contrast=2.6, centre=0.50, gamma=1.15,
                      noise=0.04, noise_corr=0.003, blur=0.005, edge_amount=0.0,
                      edge_radius=0.02, collimation=(0.0, 0.06), collimation_value=0.1,
                      rotation_deg=4.0, magnification=1.05, grid_lines=0.0),
}


def pose_matrix(study: StudyNoise, style: str, size: int) -> np.ndarray:
    """2x3 affine body frame -> detector: rotation, magnification and shift of the patient."""
    st = STYLES[style]
    ang = st.rotation_deg * float(np.tanh(study.rotation / 2.0) * 2.0)
    scale = st.magnification * (1.0 + 0.03 * float(np.tanh(study.scale)))
    m = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), ang, scale)
    m[0, 2] += 0.02 * size * float(np.tanh(study.shift_x))
    m[1, 2] += 0.02 * size * float(np.tanh(study.shift_y))
    return m


def warp(image: np.ndarray, m: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Apply the pose ``m`` to a body-frame raster (edges replicated)."""
    s = image.shape[0]
    flag = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.warpAffine(image, m, (s, s), flags=flag, borderMode=cv2.BORDER_REPLICATE)


def _noise_field(rng: np.random.Generator, size: int, corr: float) -> np.ndarray:
    n = rng.standard_normal((size, size), dtype=np.float32)
    s = corr * size
    if s >= 0.3:
        n = cv2.GaussianBlur(n, (0, 0), s)
        n /= max(float(n.std()), 1e-6)
    return n


def _tubes(atten: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Portable studies: endotracheal tube, nasogastric tube and ECG leads."""
    s = atten.shape[0]
    out = atten.copy()
    lines = np.zeros_like(out)
    x = s * (0.5 + rng.normal(0, 0.008))
    tip = s * rng.uniform(0.26, 0.32)
    t = max(1, round(0.012 * s))
    cv2.line(lines, (int(x), 0), (int(x + 0.01 * s), int(tip)), 0.35, t, cv2.LINE_AA)
    ng = np.array([[x - 0.02 * s, 0], [x - 0.015 * s, 0.5 * s], [x + 0.08 * s, 0.78 * s]])
    cv2.polylines(lines, [ng.astype(np.int32)], False, 0.3, max(1, t - 1), cv2.LINE_AA)
    for _ in range(3):
        cx, cy = rng.uniform(0.15, 0.85) * s, rng.uniform(0.1, 0.35) * s
        cv2.circle(lines, (int(cx), int(cy)), max(2, round(0.018 * s)), 0.6, -1, cv2.LINE_AA)
        cv2.line(lines, (int(cx), int(cy)), (int(cx + rng.normal(0, 0.2) * s), 0), 0.25,
                 max(1, round(0.005 * s)), cv2.LINE_AA)
    return out + lines


@lru_cache(maxsize=32)
def _sprite(text: str, font: int, scale: float, th: int) -> np.ndarray:
    """Coverage ``(h, w)`` float32 in [0, 1] of a burned-in text (cached: putText is slow)."""
    (w, h), base = cv2.getTextSize(text, font, scale, th)
    cov = np.zeros((h + base + 2 * th, w + 2 * th), np.uint8)
    cv2.putText(cov, text, (th, h + th), font, scale, 255, th, cv2.LINE_AA)
    return cov.astype(np.float32) / 255.0


def _burn(img: np.ndarray, cov: np.ndarray, x: int, y: int, value: float) -> None:
    h, w = cov.shape
    s = img.shape[0]
    x, y = int(np.clip(x, 0, s - w)), int(np.clip(y, 0, s - h))
    sub = img[y:y + h, x:x + w]
    sub *= 1.0 - cov
    sub += cov * value


def _markers(img: np.ndarray, style: str, study: StudyNoise) -> None:
    """Burned-in side markers / labels, different per style."""
    s = img.shape[0]
    scale = round(s / 256.0, 3)
    th = max(1, round(s / 128))
    u = study.marker
    if style == "philips":
        cov = _sprite("R", cv2.FONT_HERSHEY_SIMPLEX, 1.0 * scale, th + 1)
        _burn(img, cov, int((0.05 + 0.05 * u) * s), int(0.03 * s), 1.0)
    elif style == "imagingdynamics":
        x0, y0 = int((0.80 - 0.05 * u) * s), int(0.05 * s)
        bw, bh = int(0.1 * s), int(0.09 * s)
        img[y0:y0 + bh, x0:x0 + bw] = 0.95
        cov = _sprite("L", cv2.FONT_HERSHEY_DUPLEX, 0.85 * scale, th)
        _burn(img, cov[: bh, : bw], x0 + int(0.015 * s), y0 + int(0.005 * s), 0.05)
    else:
        cov = _sprite("AP PORTABLE", cv2.FONT_HERSHEY_PLAIN, 1.1 * scale, th)
        _burn(img, cov, int(0.05 * s), int((0.90 - 0.03 * u) * s), 0.95)


def acquire(atten: np.ndarray, style: str, study: StudyNoise) -> np.ndarray:
    """Detector image ``(S, S)`` float32 in [0, 1] of a posed attenuation map."""
    st = STYLES[style]
    s = atten.shape[0]
    rng = np.random.default_rng(study.acq_seed)
    if style == "portable":
        atten = _tubes(atten, np.random.default_rng(study.acq_seed + 1))
    exposure = 1.0 + 0.06 * float(np.tanh(study.exposure))
    a = atten * exposure
    # quantum noise: larger where less radiation reaches the detector (dense regions)
    n = _noise_field(rng, s, st.noise_corr)
    a = a + st.noise * n * np.exp(0.9 * np.clip(a, 0.0, 1.8))
    if st.grid_lines > 0:
        rows = np.sin(np.arange(s, dtype=np.float32) * (np.pi * 0.9))
        a = a + st.grid_lines * rows[:, None] * (s >= 160)
    lo, hi = st.window
    v = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    y0, y1 = 1.0 / (1.0 + np.exp(st.contrast * st.centre)), 1.0 / (1.0 + np.exp(-st.contrast * (1 - st.centre)))
    v = (1.0 / (1.0 + np.exp(-st.contrast * (v - st.centre))) - y0) / (y1 - y0)
    v = np.clip(v, 0.0, 1.0).astype(np.float32)
    if st.gamma != 1.0:
        v = np.power(v, np.float32(st.gamma))
    if st.blur * s >= 0.3:
        v = cv2.GaussianBlur(v, (0, 0), st.blur * s)
    if st.edge_amount > 0:
        low = cv2.GaussianBlur(v, (0, 0), max(st.edge_radius * s, 0.5))
        v = v + st.edge_amount * (v - low)
    lo_m, hi_m = st.collimation
    m = [int(round((lo_m + (hi_m - lo_m) * c) * s)) for c in study.collimation]
    if m[0]:
        v[: m[0]] = st.collimation_value
    if m[1]:
        v[s - m[1]:] = st.collimation_value
    if m[2]:
        v[:, : m[2]] = st.collimation_value
    if m[3]:
        v[:, s - m[3]:] = st.collimation_value
    _markers(v, style, study)
    return np.clip(v, 0.0, 1.0).astype(np.float32)
