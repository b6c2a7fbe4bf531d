"""Figures and shipped samples of the phantom.

``make_montage``: rows = scanner styles and findings (realistic regime: normal,
small and large effusions, a bilateral one, cardiomegaly, devices; easy regime:
style x normal/effusion), columns = the factual image and its three true
counterfactuals (scanner flipped, effusion flipped, both), each with the gold-mask
contour (red: right lung, green: left lung).
``write_samples``: a handful of 512-px scans for the app (16-bit PNG + JSON).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from pcl_viewer.data.phantom import DEFAULT_REGIME, PHANTOM_VERSION
from pcl_viewer.data.phantom.generate import write_png16
from pcl_viewer.data.phantom.scm import Renderer, Study, sample_studies, standard_dos
from pcl_viewer.parents import VIEW_KINDS

ROWS: tuple[tuple[str, bool], ...] = tuple(
    (s, e) for s in ("philips", "imagingdynamics", "portable") for e in (False, True))


def _typical(s: Study) -> bool:
    return max(abs(c) for c in s.noise.patient.shape[:4]) < 1.2


#: Realistic-regime rows: (style, effusion, caption, predicate on the study's noise).
REALISTIC_ROWS = (
    ("philips", False, "normal", lambda s: not s.noise.extra.cardiomegaly),
    ("philips", True, "small effusion",
     lambda s: s.noise.effusion.severity < 0.2 and s.noise.effusion.side != "bilateral"),
    ("imagingdynamics", True, "large effusion",
     lambda s: s.noise.effusion.severity > 0.6 and s.noise.effusion.side != "bilateral"
     and s.noise.extra.layering > 0.35),
    ("imagingdynamics", False, "cardiomegaly", lambda s: s.noise.extra.cardiomegaly),
    ("philips", True, "bilateral effusion",
     lambda s: s.noise.effusion.side == "bilateral" and s.noise.effusion.severity > 0.4),
    ("portable", True, "effusion, devices",
     lambda s: len(s.noise.extra.devices) >= 3 and s.noise.effusion.severity > 0.3),
)


def _pick(seed: int, n: int, regime: str = "easy") -> list[Study]:
    """Studies for the montage rows, fixed by ``seed``: ``easy`` takes ``n`` typical ones
    (lung shape within 1.2 sd on the main modes) with a visible (moderate, unilateral)
    effusion noise; ``realistic`` one per :data:`REALISTIC_ROWS` predicate."""
    studies = sample_studies(400 if regime == "easy" else 3000, seed, studies_per_patient=1,
                             regime=regime)
    if regime == "easy":
        good = [s for s in studies if 0.45 < s.noise.effusion.severity < 0.8
                and s.noise.effusion.side != "bilateral" and _typical(s)]
        return good[:n]
    out = []
    for _, _, _, pred in REALISTIC_ROWS[:n]:
        out.append(next(s for s in studies if _typical(s) and pred(s) and s not in out))
    return out


def overlay(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``(S, S, 3)`` uint8 BGR of a grey image with the gold contours."""
    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mask is not None:
        th = max(1, image.shape[0] // 200)
        for label, colour in ((1, (40, 40, 255)), (2, (60, 220, 60))):
            cs, _ = cv2.findContours((mask == label).astype(np.uint8), cv2.RETR_EXTERNAL,
                                     cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, cs, -1, colour, th, cv2.LINE_AA)
    return np.ascontiguousarray(rgb)


def _label(canvas: np.ndarray, text: str, x: int, y: int, scale: float) -> None:
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                cv2.LINE_AA)


def make_montage(out: Path, size: int = 256, seed: int = 0,
                 regime: str = DEFAULT_REGIME) -> np.ndarray:
    """Write the montage PNG and return it (``(H, W, 3)`` uint8 BGR)."""
    if regime == "easy":
        rows = [(st, ef, "effusion" if ef else "normal") for st, ef in ROWS]
    else:
        rows = [(st, ef, cap) for st, ef, cap, _ in REALISTIC_ROWS]
    studies = _pick(seed, len(rows), regime)
    head, side = 28, 150
    cols = ("factual", "do(scanner flipped)", "do(effusion flipped)", "do(both)")
    canvas = np.zeros((head + len(rows) * size, side + len(cols) * size, 3), np.uint8)
    for c, name in enumerate(cols):
        _label(canvas, name, side + c * size + 6, 19, 0.5)
    for r, ((style, eff, caption), st) in enumerate(zip(rows, studies)):
        parents = replace(st.parents, style=style, effusion=eff)
        ren = Renderer(st.noise)
        views = [ren.render(parents, size)]
        dos = standard_dos(st.noise, parents)
        views += [ren.counterfactual(parents, dos[k], size) for k in VIEW_KINDS]
        y = head + r * size
        for c, (img, mask) in enumerate(views):
            canvas[y:y + size, side + c * size: side + (c + 1) * size] = overlay(img, mask)
        _label(canvas, style, 6, y + size // 2 - 10, 0.5)
        side_txt = f"{caption} ({st.noise.effusion.side})" if eff else caption
        _label(canvas, side_txt, 6, y + size // 2 + 12, 0.45)
        _label(canvas, f"{parents.sex}, {parents.age:.0f} y", 6, y + size // 2 + 32, 0.45)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), canvas, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return canvas


def write_samples(out: Path, size: int = 512, seed: int = 0,
                  regime: str = DEFAULT_REGIME) -> list[dict]:
    """Five scans: both scanners x (normal, effusion) and one portable; plus samples.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from pcl_viewer.data import rle

    chosen = (("philips", False), ("philips", True), ("imagingdynamics", False),
              ("imagingdynamics", True), ("portable", False))
    info = []
    if regime == "easy":
        picked = _pick(seed + 1, len(chosen))
    else:  # typical studies with a moderate one-sided effusion noise
        pool = sample_studies(600, seed + 1, studies_per_patient=1, regime=regime)
        picked = [s for s in pool if _typical(s) and 0.4 < s.noise.effusion.severity < 0.75
                  and s.noise.effusion.side != "bilateral"][: len(chosen)]
    for (style, eff), st in zip(chosen, picked):
        parents = replace(st.parents, style=style, effusion=eff)
        img, mask = Renderer(st.noise).render(parents, size)
        name = f"phantom_{style}_{'effusion' if eff else 'normal'}.png"
        write_png16(out / name, img, bits=12)
        r_rle, l_rle = rle.encode_lungs(mask)
        info.append({
            "file": name, "size": size, "parents": parents.to_dict(),
            "effusion_side": st.noise.effusion.side if eff else None,
            "effusion_severity": round(st.noise.effusion.severity, 3) if eff else None,
            "gold": {"Right Lung": r_rle, "Left Lung": l_rle, "Height": size, "Width": size},
            "noise": st.noise.to_dict(),
        })
    (out / "samples.json").write_text(json.dumps(
        {"generator": f"pcl phantom samples --size {size} --seed {seed} --regime {regime}",
         "phantom_version": PHANTOM_VERSION, "regime": regime, "samples": info}))
    return info
