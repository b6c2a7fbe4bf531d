"""Acquisition mechanisms: pose, detector noise, tone curve, MTF, edge enhancement,
collimation and burned-in markers, per scanner style.

``philips`` and ``imagingdynamics`` are the two PadChest manufacturers; the
held-out ``portable`` style imitates a bedside AP study (low contrast, more
noise, blur, tilt, magnified heart — see :mod:`.anatomy` — and lines/tubes).
All functions take and return ``(S, S)`` float32 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np

from pcl_viewer.data.phantom.noise import ExtraNoise, StudyNoise


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


def pose_matrix(study: StudyNoise, style: str, size: int,
                realistic: bool = False) -> np.ndarray:
    """2x3 affine body frame -> detector: rotation, magnification and shift of the patient.

    ``realistic``: a few degrees of rotation (more on portable studies), +-12 % scale and
    +-7 % shift, instead of the earlier near-fixed pose.
    """
    st = STYLES[style]
    rot = st.rotation_deg * (3.5 if realistic else 1.0)
    ang = rot * float(np.tanh(study.rotation / 2.0) * 2.0)
    ds, dxy = (0.12, 0.07) if realistic else (0.03, 0.02)
    scale = st.magnification * (1.0 + ds * float(np.tanh(study.scale)))
    m = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), ang, scale)
    m[0, 2] += dxy * size * float(np.tanh(study.shift_x))
    m[1, 2] += dxy * size * float(np.tanh(study.shift_y))
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


def jittered(style: str, look: list[float]) -> Style:
    """The scanner's look for one study: each style is a distribution of looks (tone
    curve, contrast, noise level and texture, sharpness, edge enhancement), the study's
    standard-normal ``look`` draws placing it inside that distribution."""
    st = STYLES[style]
    t = np.tanh
    lo, hi = st.window
    shift = 0.06 * float(t(look[6]))
    return replace(
        st, contrast=st.contrast * float(np.exp(0.18 * t(look[0]))),
        centre=st.centre + 0.05 * float(t(look[1])),
        gamma=st.gamma * float(np.exp(0.15 * t(look[2]))),
        edge_amount=max(0.0, st.edge_amount * float(np.exp(0.5 * t(look[4]))) + 0.15 * float(t(look[4]))),
        noise=st.noise * float(np.exp(0.7 * t(look[5]))),
        noise_corr=st.noise_corr + 0.002 * abs(float(look[5])),
        blur=st.blur * float(np.exp(0.4 * t(look[7]))),
        window=(lo + shift, hi + shift))


def _devices(atten: np.ndarray, extra: ExtraNoise) -> np.ndarray:
    """Lines, tubes, ECG leads, pacemakers and clips (attenuation added after the pose)."""
    s = atten.shape[0]
    rng = np.random.default_rng(extra.device_seed)
    out = atten.copy()
    lay = np.zeros_like(out)
    t1 = max(1, round(0.006 * s))
    if "ecg" in extra.devices:
        for _ in range(int(rng.integers(2, 5))):
            cx, cy = rng.uniform(0.12, 0.88) * s, rng.uniform(0.08, 0.7) * s
            cv2.circle(lay, (int(cx), int(cy)), max(2, round(0.016 * s)), 0.5, -1, cv2.LINE_AA)
            ex, ey = cx + rng.normal(0, 0.15) * s, cy + rng.choice([-1.0, 1.0]) * 0.3 * s
            mid = ((cx + ex) / 2 + rng.normal(0, 0.08) * s, (cy + ey) / 2)
            pts = np.array([[cx, cy], mid, [ex, ey]], np.int32)
            cv2.polylines(lay, [pts], False, 0.08, t1, cv2.LINE_AA)
    if "line" in extra.devices:  # central venous line: subclavian -> superior vena cava
        side = rng.choice([-1.0, 1.0])
        x0 = 0.5 + side * rng.uniform(0.3, 0.4)
        pts = np.array([[x0, 0.18], [0.5 + side * 0.18, 0.2], [0.5 + side * 0.05, 0.26],
                        [0.5 - 0.03, 0.3 + rng.uniform(0, 0.08)]]) * s
        cv2.polylines(lay, [pts.astype(np.int32)], False, 0.3, t1, cv2.LINE_AA)
    if "tube" in extra.devices:  # endotracheal + nasogastric tube
        x = s * (0.5 + rng.normal(0, 0.01))
        cv2.line(lay, (int(x), 0), (int(x), int(s * rng.uniform(0.24, 0.32))), 0.35,
                 max(1, round(0.012 * s)), cv2.LINE_AA)
        ng = np.array([[x - 0.02 * s, 0], [x - 0.01 * s, 0.55 * s], [x + 0.1 * s, 0.8 * s]])
        cv2.polylines(lay, [ng.astype(np.int32)], False, 0.3, t1, cv2.LINE_AA)
    if "pacemaker" in extra.devices:
        px, py = rng.uniform(0.62, 0.75) * s, rng.uniform(0.12, 0.2) * s
        w, h = 0.075 * s, 0.055 * s
        box = cv2.boxPoints(((px, py), (w, h), float(rng.uniform(-20, 20))))
        cv2.fillPoly(lay, [box.astype(np.int32)], 1.2, cv2.LINE_AA)
        lead = np.array([[px, py], [0.5 * s, 0.3 * s], [0.45 * s, 0.45 * s],
                         [0.55 * s, 0.58 * s]])
        cv2.polylines(lay, [lead.astype(np.int32)], False, 0.45, t1, cv2.LINE_AA)
    if "clips" in extra.devices:
        for _ in range(int(rng.integers(2, 6))):
            cx, cy = rng.uniform(0.42, 0.58) * s, rng.uniform(0.25, 0.55) * s
            a = rng.uniform(0, np.pi)
            d = 0.012 * s * np.array([np.cos(a), np.sin(a)])
            cv2.line(lay, (int(cx - d[0]), int(cy - d[1])), (int(cx + d[0]), int(cy + d[1])),
                     0.9, max(1, round(0.004 * s)), cv2.LINE_AA)
    return out + lay


def _veil_and_equalise(v: np.ndarray, extra: ExtraNoise) -> np.ndarray:
    """Scatter veil (lower contrast everywhere) and, in half the studies, local contrast
    equalisation (CLAHE, as vendor processing does)."""
    s = v.shape[0]
    k = 0.6 * extra.veil**1.2
    if k > 0.005:
        low = cv2.GaussianBlur(v, (0, 0), 0.15 * s)
        v = (1.0 - k) * v + k * (0.55 * low + 0.45 * float(v.mean()))
    if extra.look[3] > 0.0:
        clip = 1.0 + 0.8 * float(np.tanh(extra.look[3]))
        clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(4, 4))
        q = np.round(np.clip(v, 0.0, 1.0) * 65535).astype(np.uint16)
        v = clahe.apply(q).astype(np.float32) / 65535.0
    return v


def _burned_text(img: np.ndarray, extra: ExtraNoise) -> None:
    """Burned-in patient/site text in a corner (realistic regime, any style)."""
    s = img.shape[0]
    rng = np.random.default_rng(extra.device_seed + 3)
    scale = round(s / 384.0, 3)
    th = max(1, round(s / 256))
    text = f"{int(rng.integers(10, 99))}/{int(rng.integers(1, 12)):02d} ID{int(rng.integers(1e5)):05d}"
    cov = _sprite(text, cv2.FONT_HERSHEY_PLAIN, scale, th)
    x = int(rng.choice([0.03, 0.55]) * s)
    y = int(rng.choice([0.01, 0.93]) * s)
    _burn(img, cov, x, y, float(rng.choice([0.95, 0.05])))


def acquire(atten: np.ndarray, style: str, study: StudyNoise,
            extra: ExtraNoise | None = None) -> np.ndarray:
    """Detector image ``(S, S)`` float32 in [0, 1] of a posed attenuation map.

    ``extra`` (realistic regime): devices, a per-study look drawn from the style's
    distribution, scatter veil, local contrast equalisation and burned-in text.
    """
    st = STYLES[style] if extra is None else jittered(style, extra.look)
    s = atten.shape[0]
    rng = np.random.default_rng(study.acq_seed)
    if style == "portable":
        atten = _tubes(atten, np.random.default_rng(study.acq_seed + 1))
    if extra is not None and extra.devices:
        atten = _devices(atten, extra)
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
    if extra is not None:
        v = _veil_and_equalise(v, extra)
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
    if extra is not None and "text" in extra.devices:
        _burned_text(v, extra)
    return np.clip(v, 0.0, 1.0).astype(np.float32)
