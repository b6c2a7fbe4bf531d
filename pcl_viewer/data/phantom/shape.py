"""Statistical shape model (SSM) of the two lungs, built from real masks.

Source: ``data/semantic_masks_v7labs_lungs.zip`` inside the installed
torchxrayvision package (517 binary lung masks of real chest radiographs).
Each usable mask gives a right lung (image left in PA) and a left lung contour;
each contour is resampled to :data:`N_PER_LUNG` corresponding landmarks between
three anatomical anchors (apex, lateral costophrenic angle, medial
cardiophrenic angle). The joint 2 x ``N_PER_LUNG`` landmark set is aligned by
generalised Procrustes analysis (translation, scale, rotation) and reduced by
PCA to the modes covering at least 95 % of the variance.

Coordinates: ``(x, y)`` with x to the image right and y down, in the aligned
(unit-norm, centred) frame. :class:`ShapeModel` maps coefficients to contours.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

#: Landmarks per lung on each segment: lateral wall (apex -> costophrenic angle),
#: diaphragm (costophrenic -> cardiophrenic angle), medial border (-> apex).
SEGMENTS: tuple[int, int, int] = (20, 12, 18)
N_PER_LUNG: int = sum(SEGMENTS)
MASKS_ZIP = "semantic_masks_v7labs_lungs.zip"


@dataclass
class ShapeModel:
    """PCA shape model of the joint two-lung contour.

    Attributes:
        mean: ``(2 * N_PER_LUNG, 2)`` mean landmarks; rows ``[:N]`` right lung,
            ``[N:]`` left lung, in the aligned frame.
        modes: ``(K, 2 * N_PER_LUNG * 2)`` orthonormal PCA modes.
        std: ``(K,)`` standard deviation of each mode's coefficient.
        explained: ``(K,)`` fraction of variance per mode.
        meta: provenance (counts, filters).
    """

    mean: np.ndarray
    modes: np.ndarray
    std: np.ndarray
    explained: np.ndarray
    meta: dict

    @property
    def n_modes(self) -> int:
        return int(self.modes.shape[0])

    def instance(self, coeffs: np.ndarray) -> np.ndarray:
        """Landmarks ``(2N, 2)`` for standardised coefficients ``coeffs`` (K,) (units of std)."""
        b = np.zeros(self.n_modes)
        c = np.asarray(coeffs, dtype=np.float64)[: self.n_modes]
        b[: len(c)] = c
        flat = self.mean.reshape(-1) + (b * self.std) @ self.modes
        return flat.reshape(-1, 2)

    def to_dict(self) -> dict:
        return {
            "landmarks_per_lung": N_PER_LUNG,
            "segments": list(SEGMENTS),
            "mean": np.round(self.mean, 6).tolist(),
            "modes": np.round(self.modes, 6).tolist(),
            "std": np.round(self.std, 6).tolist(),
            "explained_variance_ratio": np.round(self.explained, 6).tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShapeModel:
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float64),
            modes=np.asarray(d["modes"], dtype=np.float64),
            std=np.asarray(d["std"], dtype=np.float64),
            explained=np.asarray(d["explained_variance_ratio"], dtype=np.float64),
            meta=d.get("meta", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> ShapeModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _resample(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points equally spaced by arc length along an open polyline (excl. its end)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return np.repeat(points[:1], n, axis=0)
    t = np.linspace(0.0, s[-1], n, endpoint=False)
    return np.stack([np.interp(t, s, points[:, 0]), np.interp(t, s, points[:, 1])], axis=1)


def lung_landmarks(contour: np.ndarray, lateral_sign: float) -> np.ndarray | None:
    """Corresponding landmarks ``(N_PER_LUNG, 2)`` of one closed lung contour.

    Args:
        contour: ``(P, 2)`` closed contour (x, y) in pixels.
        lateral_sign: -1 for the right lung (lateral = image left), +1 for the left lung.
    """
    c = contour.astype(np.float64)
    x, y = c[:, 0], c[:, 1]
    w, h = np.ptp(x), np.ptp(y)
    if w < 5 or h < 5:
        return None
    yn = (y - y.min()) / h
    lat = (x - x.min()) / w if lateral_sign > 0 else (x.max() - x) / w
    top = np.flatnonzero(yn <= yn.min() + 0.01)
    apex = int(top[np.argmin(np.abs(lat[top] - np.median(lat[top])))])
    cp = int(np.argmax(yn + lat))
    mb = int(np.argmax(yn + 0.6 * (1.0 - lat)))
    n = len(c)
    order = np.roll(np.arange(n), -apex)
    pos = {int(k): i for i, k in enumerate(order)}
    if pos[cp] > pos[mb]:  # walk apex -> lateral wall -> base -> medial border
        order = np.roll(order[::-1], 1)
        pos = {int(k): i for i, k in enumerate(order)}
    i_cp, i_mb = pos[cp], pos[mb]
    if not (0 < i_cp < i_mb < n):
        return None
    path = c[order]
    closed = np.concatenate([path, path[:1]], axis=0)
    parts = [closed[: i_cp + 1], closed[i_cp : i_mb + 1], closed[i_mb:]]
    if min(len(p) for p in parts) < 3:
        return None
    return np.concatenate([_resample(p, k) for p, k in zip(parts, SEGMENTS)], axis=0)


def extract_two_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
    """Right and left lung landmarks of a binary mask, or the reason it is unusable."""
    binary = mask > 63
    scale = 512.0 / max(binary.shape)
    if scale < 1.0:
        binary = cv2.resize(binary.astype(np.uint8), None, fx=scale, fy=scale,
                            interpolation=cv2.INTER_NEAREST) > 0
    binary = ndimage.binary_fill_holes(binary)
    n, labels, stats, cents = cv2.connectedComponentsWithStats(binary.astype(np.uint8), 8)
    if n < 3:
        return "fewer than two components"
    order = np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2] + 1
    areas = stats[order, cv2.CC_STAT_AREA].astype(float)
    total = binary.shape[0] * binary.shape[1]
    if areas[1] < 0.02 * total or areas[1] / areas[0] < 0.35:
        return "components too small or unbalanced"
    a, b = (int(i) for i in order)
    if cents[a][0] > cents[b][0]:
        a, b = b, a  # a: image left = patient's right lung
    boxes = stats[[a, b]]
    if boxes[0, 0] + boxes[0, 2] > boxes[1, 0] + 0.25 * boxes[1, 2]:
        return "lungs overlap horizontally"
    hs = boxes[:, 3].astype(float)
    if hs.min() / hs.max() < 0.6:
        return "lung heights inconsistent"
    out = []
    for comp, sign in ((a, -1.0), (b, 1.0)):
        cs, _ = cv2.findContours((labels == comp).astype(np.uint8), cv2.RETR_EXTERNAL,
                                 cv2.CHAIN_APPROX_NONE)
        cont = max(cs, key=cv2.contourArea)[:, 0, :]
        area = cv2.contourArea(cont)
        hull = cv2.contourArea(cv2.convexHull(cont))
        if hull <= 0 or area / hull < 0.7:
            return "irregular outline"
        lm = lung_landmarks(cont, sign)
        if lm is None:
            return "no anchors"
        out.append(lm)
    return out[0], out[1]


def procrustes(shapes: np.ndarray, iters: int = 10) -> np.ndarray:
    """Generalised Procrustes alignment of ``(M, P, 2)`` shapes (no reflection)."""
    x = shapes - shapes.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=(1, 2), keepdims=True)
    ref = x[0].copy()
    for _ in range(iters):
        for i in range(len(x)):
            u, _, vt = np.linalg.svd(x[i].T @ ref)
            r = u @ vt
            if np.linalg.det(r) < 0:
                u[:, -1] *= -1
                r = u @ vt
            x[i] = x[i] @ r
        new = x.mean(axis=0)
        new /= np.linalg.norm(new)
        if np.allclose(new, ref, atol=1e-8):
            break
        ref = new
    return x


def build_shape_model(zip_path: Path, var_kept: float = 0.95) -> ShapeModel:
    """Read every mask of ``zip_path`` and fit the two-lung PCA shape model."""
    shapes, reasons = [], {}
    with zipfile.ZipFile(zip_path) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        for name in names:
            mask = cv2.imdecode(np.frombuffer(z.read(name), np.uint8), cv2.IMREAD_GRAYSCALE)
            res = None if mask is None else extract_two_lungs(mask)
            if res is None or isinstance(res, str):
                key = res or "unreadable"
                reasons[key] = reasons.get(key, 0) + 1
                continue
            shapes.append(np.concatenate(res, axis=0))
    aligned = procrustes(np.stack(shapes))
    dist = np.linalg.norm(aligned - aligned.mean(axis=0), axis=(1, 2))
    keep = dist < dist.mean() + 3 * dist.std()
    reasons["Procrustes outlier (> mean + 3 sd)"] = int((~keep).sum())
    aligned = procrustes(np.stack(shapes)[keep])
    flat = aligned.reshape(len(aligned), -1)
    mean = flat.mean(axis=0)
    _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    var = s**2 / (len(flat) - 1)
    ratio = var / var.sum()
    k = int(np.searchsorted(np.cumsum(ratio), var_kept) + 1)
    meta = {
        "source": f"torchxrayvision data/{MASKS_ZIP}",
        "n_masks": len(names),
        "n_used": int(len(flat)),
        "rejected": reasons,
        "variance_kept": float(np.cumsum(ratio)[k - 1]),
        "anchors": "apex (top), lateral costophrenic angle, medial cardiophrenic angle",
    }
    return ShapeModel(mean.reshape(-1, 2), vt[:k], np.sqrt(var[:k]), ratio[:k], meta)
