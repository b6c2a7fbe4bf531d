"""A second, deliberately different CXR-like renderer, for validation only.

It draws its own images around the phantom's gold lung masks: dark lungs with a
blotchy texture, bright ribs as sinusoidal bands across the whole thorax, a bright
spine band, an elliptical heart, straight fluid levels instead of a meniscus, its
own tone curve, blur and noise. Nothing of the phantom's renderer (tone curves,
vessels, scanner styles) is reused, so a segmenter that scores well here has learnt
lung shape and context rather than our renderer's look. Never train on it.

``write_independent_set`` writes ``images/*.png``, ``masks/*.png`` (0/1/2) and
``labels.csv`` (file, effusion), the layout ``pcl evaluate --images --masks`` reads.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """``(S, S)`` float32 low-frequency noise, unit std."""
    c = rng.standard_normal((cells, cells)).astype(np.float32)
    out = cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC)
    return out / max(float(out.std()), 1e-6)


def render_independent(mask: np.ndarray, fluid: np.ndarray, rng: np.random.Generator
                       ) -> np.ndarray:
    """An image ``(S, S)`` float32 in [0, 1] around a gold mask.

    Args:
        mask: ``(S, S)`` uint8 gold mask (0 background, 1 right, 2 left lung).
        fluid: ``(S, S)`` bool, lung field covered by fluid (drawn as a dense region with
            a straight upper level).
        rng: randomness of the look.
    """
    s = mask.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    lung = mask > 0
    ys, xs = np.nonzero(lung | fluid)
    if len(ys) == 0:
        ys, xs = np.array([s // 2]), np.array([s // 2])
    top, bottom = ys.min() / s, ys.max() / s
    left, right = xs.min() / s, xs.max() / s
    cx = 0.5 * (left + right)
    # body: a rounded trapezoid of soft tissue, brighter below the lungs (abdomen)
    half = 0.5 * (right - left) + rng.uniform(0.05, 0.1)
    body = (np.abs(xx - cx) < half * (0.85 + 0.15 * np.clip((yy - top) * 3, 0, 1))).astype(
        np.float32)
    body = cv2.GaussianBlur(body, (0, 0), 0.02 * s)
    img = 0.05 + body * rng.uniform(0.5, 0.65)
    img += body * 0.12 * np.clip((yy - bottom + 0.05) * 6, 0, 1)
    # spine and heart
    spine = np.exp(-(((xx - cx) / rng.uniform(0.025, 0.04)) ** 2)) * (yy > top - 0.1)
    img += 0.18 * spine
    hy = bottom - rng.uniform(0.1, 0.16)
    heart = (((xx - cx - rng.uniform(0.02, 0.06)) / rng.uniform(0.12, 0.17)) ** 2
             + ((yy - hy) / rng.uniform(0.09, 0.13)) ** 2) < 1
    img += 0.1 * cv2.GaussianBlur(heart.astype(np.float32), (0, 0), 0.01 * s)
    # lungs: dark with blotchy texture; fluid as dense as soft tissue
    tex = _smooth_noise(rng, s, int(rng.integers(10, 20)))
    dark = rng.uniform(0.3, 0.45)
    lung_f = cv2.GaussianBlur(lung.astype(np.float32), (0, 0), rng.uniform(0.6, 1.5))
    img -= lung_f * (dark + 0.04 * tex)
    img += fluid.astype(np.float32) * 0.03
    # ribs: bright sinusoidal bands across the thorax (over the lungs too)
    period = rng.uniform(0.07, 0.09)
    phase = rng.uniform(0, 1)
    arc = yy + 0.08 * (np.abs(xx - cx) / max(half, 1e-3)) ** 2
    ribs = np.clip(np.sin(2 * np.pi * (arc / period + phase)), 0, 1) ** 3
    img += rng.uniform(0.15, 0.35) * ribs * body * (yy < bottom + 0.02)
    # vessels: a few bright lines from the hila
    ves = np.zeros((s, s), np.float32)
    for sgn in (-1, 1):
        hx, hyl = cx + sgn * 0.08, top + 0.45 * (bottom - top)
        for _ in range(10):
            a = rng.uniform(-1.2, 1.2)
            ln = rng.uniform(0.08, 0.2)
            x1, y1 = hx + sgn * np.cos(a) * ln, hyl + np.sin(a) * ln
            cv2.line(ves, (int(hx * s), int(hyl * s)), (int(x1 * s), int(y1 * s)), 0.14,
                     max(1, s // 128), cv2.LINE_AA)
    img += cv2.GaussianBlur(ves, (0, 0), 0.7) * lung
    # acquisition: blur, noise, tone curve
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.5, 1.2))
    img += rng.uniform(0.005, 0.025) * rng.standard_normal((s, s)).astype(np.float32)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    return np.clip(img, 0, 1).astype(np.float32)


def write_independent_set(out: Path, n: int, seed: int, size: int = 128,
                          effusion_oversample: float = 8.0) -> dict:
    """Render ``n`` independent-look images around fresh phantom gold masks.

    The lung shapes, poses and fluid regions come from the phantom's structural causal
    model (seed ``seed``, realistic regime); the pixels do not. The fluid region is the
    lung field the effusion-free counterfactual has and the factual has not.
    """
    from pcl_viewer.data.phantom.scm import Renderer, sample_studies

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 99])
    studies = sample_studies(n, seed, oversample=effusion_oversample, studies_per_patient=1)
    rows = []
    for i, st in enumerate(studies):
        ren = Renderer(st.noise)
        _, mask = ren.render(st.parents, size)
        if st.parents.effusion:
            _, dry = ren.counterfactual(st.parents, {"effusion": False}, size)
            fluid = (dry > 0) & (mask == 0)
        else:
            fluid = np.zeros_like(mask, bool)
        img = render_independent(mask, fluid, rng)
        name = f"independent_s{seed}_{i:05d}.png"
        cv2.imwrite(str(out / "images" / name), np.round(img * 65535).astype(np.uint16))
        cv2.imwrite(str(out / "masks" / name), mask)
        rows.append({"file": name, "effusion": int(st.parents.effusion)})
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["file", "effusion"])
        w.writeheader()
        w.writerows(rows)
    return {"n": n, "seed": seed, "size": size,
            "effusion_share": float(np.mean([r["effusion"] for r in rows]))}
