"""Rasterise the phantom's anatomy into attenuation layers at any size.

Attenuation units: 1.0 is the soft-tissue path through the middle of the
chest; air outside the body is 0. Lungs subtract their air, bone adds.
``Layers`` keeps the parts separately so that counterfactuals reuse them:
``attenuation(fluid) = base - lung * (1 - fluid) + fluid_extra``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from pcl_viewer.data.phantom.anatomy import MIDLINE, Anatomy
from pcl_viewer.data.phantom.effusion import fluid_sides, fluid_weight, layering_weight
from pcl_viewer.data.phantom.noise import EffusionNoise, ExogenousNoise, StudyParents

SHIFT = 4  # sub-pixel bits for cv2 drawing
LUNG_AIR = 0.68  # attenuation removed by a full-depth lung


@dataclass
class Layers:
    """Size-``S`` rasters of one anatomy (body frame, before pose).

    Attributes:
        base: ``(S, S)`` float32 attenuation of everything but the aerated lung.
        lung: ``(S, S)`` float32 attenuation the aerated lung removes (air minus vessels).
        lung_depth: ``(S, S)`` float32 in [0, 1], relative lung thickness.
        raw: ``(S, S)`` uint8 lung fields 0/1/2 before removing mediastinum and heart.
        aerated: ``(S, S)`` uint8 gold mask without effusion (0/1/2).
    """

    base: np.ndarray
    lung: np.ndarray
    lung_depth: np.ndarray
    raw: np.ndarray
    aerated: np.ndarray
    size: int


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(S,)`` in [0, 1] (same for x and y) and a 2-D Y."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c, np.repeat(c[:, None], size, axis=1)


def _pts(poly: np.ndarray, size: int) -> np.ndarray:
    return np.round(poly * size * (1 << SHIFT)).astype(np.int32)


def _fill(poly: np.ndarray, size: int, value: float = 1.0, canvas=None, dtype=np.uint8):
    canvas = np.zeros((size, size), dtype) if canvas is None else canvas
    cv2.fillPoly(canvas, [_pts(poly, size)], value, cv2.LINE_8, SHIFT)
    return canvas


def _lines(canvas, polys: np.ndarray, size: int, value: float, thick: float) -> None:
    """Draw a stack ``(R, P, 2)`` of polylines in one call."""
    t = max(1, int(round(thick * size)))
    cv2.polylines(canvas, list(_pts(polys, size)), False, float(value), t, cv2.LINE_AA, SHIFT)


def _line(canvas, poly, size, value, thick):
    t = max(1, int(round(thick * size)))
    cv2.polylines(canvas, [_pts(poly, size)], False, float(value), t, cv2.LINE_AA, SHIFT)


def _blur(a: np.ndarray, sigma_frac: float) -> np.ndarray:
    s = sigma_frac * a.shape[0]
    return a if s < 0.3 else cv2.GaussianBlur(a, (0, 0), s)


def _smoothstep(x: np.ndarray, a: float, b: float) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _body(an: Anatomy, size: int) -> np.ndarray:
    xs, _ = grid(size)
    shoulder = an.thorax_half_width + 0.05
    hw = an.neck_half_width + (shoulder - an.neck_half_width) * _smoothstep(
        xs, an.shoulder_y - 0.12, an.shoulder_y + 0.06) ** 0.7
    hw = hw - 0.04 * _smoothstep(xs, an.shoulder_y + 0.03, an.shoulder_y + 0.2)
    hw = hw * (1.0 - 0.05 * _smoothstep(xs, 0.75, 1.0))
    r = (xs[None, :] - MIDLINE) / hw[:, None]
    return (np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0)) ** 0.7 * an.soft_tissue).astype(np.float32)


def _bones(an: Anatomy, size: int) -> np.ndarray:
    xs, ys = grid(size)
    bone = np.zeros((size, size), np.float32)
    d = an.bone_density
    post = np.zeros_like(bone)
    t_post = 0.024
    _lines(post, an.ribs_posterior, size, 0.085 * d, t_post)
    _lines(post, an.ribs_posterior, size, 0.06 * d, t_post * 0.5)  # medulla < cortex
    ant = np.zeros_like(bone)
    _lines(ant, an.ribs_anterior, size, 0.05 * d, t_post * 0.85)
    fade = np.clip((np.abs(xs - MIDLINE) - 0.08) / 0.2, 0.1, 1.0)  # costal cartilage
    low = np.mean(list(an.lung_bottom.values()))
    below = 1.0 - 0.8 * _smoothstep(xs, low - 0.03, low + 0.1)  # ribs fade into the abdomen
    bone += _blur((post + ant * fade[None, :]) * below[:, None], 0.0025)
    clav = np.zeros_like(bone)
    for poly in an.clavicles:
        _line(clav, poly, size, 0.16 * d, 0.036)
        _line(clav, poly, size, 0.11 * d, 0.02)
    bone += _blur(clav, 0.002)
    scap = np.zeros_like(bone)
    for poly in an.scapulae:
        _fill(poly, size, 0.06, scap, np.float32)
    bone += _blur(scap, 0.01)
    # spine (separable in x and y): vertebral bodies with brighter end plates,
    # pedicles and spinous processes
    dx = np.abs(xs - MIDLINE)
    col = 1.0 - _smoothstep(dx, an.spine_width * 0.42, an.spine_width * 0.55)
    phase = (xs / an.vertebra_period + an.vertebra_phase) % 1.0
    disc = _smoothstep(np.abs(phase - 0.5), 0.36, 0.46)
    plate = np.exp(-(((np.abs(phase - 0.5) - 0.34) / 0.05) ** 2))
    vbody = 0.06 * (1.0 - 0.5 * disc) + 0.025 * plate
    ped = np.exp(-(((dx - 0.3 * an.spine_width) / (0.07 * an.spine_width)) ** 2))
    ped_v = np.exp(-(((phase - 0.3) / 0.12) ** 2))
    spin = np.exp(-((dx / 0.006) ** 2))
    spin_v = np.exp(-(((phase - 0.75) / 0.15) ** 2))
    top = _smoothstep(xs, 0.02, 0.08)
    spine = (np.outer(vbody * top, col) + 0.05 * np.outer(ped_v * top, ped)
             + 0.03 * np.outer(spin_v * top, spin))
    return bone + (d * spine).astype(np.float32)


def _vessels(an: Anatomy, size: int) -> np.ndarray:
    """Vessel tree (one draw call per branching generation) plus hilar shadows."""
    canvas = np.zeros((size, size), np.float32)
    v = an.vessels
    for w in np.unique(v[:, 4]):
        seg = v[v[:, 4] == w]
        t = max(1, int(round(w * size)))
        val = 0.14 * min(1.0, w * size / t) * (0.45 + 0.55 * min(1.0, w / 0.008))
        _lines(canvas, seg[:, :4].reshape(-1, 2, 2), size, val, w)
    canvas = _blur(canvas, 0.0035)
    xs, _ = grid(size)
    for hx, hy in an.hila:
        canvas += 0.07 * np.outer(np.exp(-(((xs - hy) / 0.05) ** 2)),
                                  np.exp(-(((xs - hx) / 0.022) ** 2)))
    return canvas


def _texture(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 7)
    coarse = rng.standard_normal((24, 24)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _add_ellipse(canvas: np.ndarray, cx: float, cy: float, rx: float, ry: float, amp: float,
                 row_profile, sigma: float, weight: np.ndarray | None = None) -> None:
    """Add ``amp * sqrt(1 - r^2) * row_profile(y)`` (blurred) inside the ellipse's box only."""
    size = canvas.shape[0]
    pad = 3 * sigma + 1.0 / size
    r0, r1 = (max(0, int((c - e - pad) * size)) for c, e in ((cy, ry), (cx, rx)))
    r2, r3 = (min(size, int((c + e + pad) * size) + 1) for c, e in ((cy, ry), (cx, rx)))
    if r2 <= r0 or r3 <= r1:
        return
    ys = (np.arange(r0, r2, dtype=np.float32) + 0.5) / size
    xs = (np.arange(r1, r3, dtype=np.float32) + 0.5) / size
    r = ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2
    prof = np.asarray(row_profile(ys), dtype=np.float32).reshape(-1, 1)
    t = (amp * np.sqrt(np.clip(1.0 - r, 0.0, 1.0)) * prof).astype(np.float32)
    s = sigma * size
    if s >= 0.3:
        t = cv2.GaussianBlur(t, (0, 0), s, borderType=cv2.BORDER_CONSTANT)
    if weight is not None:
        t = t * weight[r0:r2, r1:r3]
    canvas[r0:r2, r1:r3] += t


def largest_parts(labels: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of each lung label (drops raster slivers).

    One labelling pass over the union: the two lungs never touch.
    """
    n, comp, stats, _ = cv2.connectedComponentsWithStats((labels > 0).astype(np.uint8), 4)
    first = np.zeros(n, np.int64)
    flat_c, flat_l = comp.ravel(), labels.ravel()
    first[flat_c] = flat_l  # lung label of each component
    keep = np.zeros(n, bool)
    for lab in (1, 2):
        ids = np.flatnonzero(first == lab)
        ids = ids[ids > 0]
        if len(ids):
            keep[ids[np.argmax(stats[ids, cv2.CC_STAT_AREA])]] = True
    return np.where(keep[comp], labels, 0).astype(labels.dtype)


def rasterise(an: Anatomy, size: int, vessel_seed: int,
              noise: ExogenousNoise | None = None) -> Layers:
    """All layers of ``an`` at ``size`` x ``size`` pixels.

    With a ``realistic`` ``noise`` the heart border is soft (it overlaps the lower left
    lung with low contrast), lung aeration varies and vessel contrast varies.
    """
    realistic = noise is not None and noise.regime == "realistic" and noise.extra is not None
    xs, ys = grid(size)
    raw = np.zeros((size, size), np.uint8)
    _fill(an.right_lung, size, 1, raw)
    _fill(an.left_lung, size, 2, raw)
    med = np.zeros((size, size), np.uint8)
    _fill(an.heart, size, 1, med)
    _fill(an.mediastinum, size, 1, med)
    kx, ky, kr = an.knob
    cv2.circle(med, (int(kx * size * 16), int(ky * size * 16)), int(kr * size * 16), 1, -1,
               cv2.LINE_8, SHIFT)
    aerated = largest_parts(np.where(med > 0, 0, raw).astype(np.uint8))
    dist = cv2.distanceTransform((raw > 0).astype(np.uint8), cv2.DIST_L2, 3) / size
    depth = 1.0 - np.exp(-dist / 0.022)
    # lungs are thicker towards the bases (posterior recesses)
    depth *= (0.85 + 0.25 * _smoothstep(ys, 0.2, 0.75))
    med_soft = _blur(med.astype(np.float32), 0.02 if realistic else 0.004)
    lung_air, vessel_gain = LUNG_AIR, 1.0
    if realistic:
        ex = noise.extra
        lung_air *= 1.0 + 0.4 * float(np.tanh(ex.aeration))
        vessel_gain = 1.0 + 0.35 * float(np.tanh(ex.look[9]))
    air = lung_air * depth * (1.0 - 0.85 * med_soft)
    lung_in = (depth * (1.0 - med_soft)).astype(np.float32)
    vessels = vessel_gain * _vessels(an, size) * _blur(lung_in, 0.01)
    texture = 0.03 * _texture(vessel_seed, size) * lung_in
    lung = (air - vessels - texture).astype(np.float32)
    body = _body(an, size)
    base = body + _bones(an, size)
    heart_extra = _blur(med.astype(np.float32), 0.02) * 0.05
    base += heart_extra * body
    trach = np.zeros_like(base)
    _line(trach, an.trachea[0], size, 0.2, 0.034)
    _line(trach, an.trachea[1], size, 0.14, 0.02)
    _line(trach, an.trachea[2], size, 0.14, 0.02)
    base -= _blur(trach, 0.004)
    if an.gastric is not None:
        gx, gy, rx, ry = an.gastric
        _add_ellipse(base, gx, gy, rx, ry, -0.3, lambda yy: yy < gy + 0.2 * ry, 0.003)
    for bx, by, rx, ry, amp in an.breasts:
        _add_ellipse(base, bx, by, rx, ry, amp,
                     lambda yy, by=by, ry=ry: _smoothstep(yy, by - 0.9 * ry, by - 0.1 * ry), 0.004,
                     weight=body > 0.05)
    return Layers(base=base.astype(np.float32), lung=lung, lung_depth=depth.astype(np.float32),
                  raw=raw, aerated=aerated, size=size)


def fluid_map(an: Anatomy, layers: Layers, noise: EffusionNoise,
              realistic: bool = False) -> np.ndarray:
    """Fluid fraction ``(S, S)`` float32 in [0, 1] inside the affected lung(s)."""
    xs, _ = grid(layers.size)
    fluid = np.zeros((layers.size, layers.size), np.float32)
    for side, sev in fluid_sides(noise).items():
        lung = an.right_lung if side == "right" else an.left_lung
        label = 1 if side == "right" else 2
        w = fluid_weight(lung, side, sev, noise.meniscus, xs, xs, realistic)
        fluid = np.maximum(fluid, w * (layers.raw == label))
    return fluid


def _opacities(an: Anatomy, layers: Layers, patches: list[list[float]], seed: int) -> np.ndarray:
    """Consolidation / atelectasis: fraction ``(S, S)`` in [0, 1] of lung air replaced.

    Each patch is ``[lung (0 right, 1 left), u, v, size, density]`` with ``u, v`` in the
    lung's bounding box; its outline is a blurred blob with a coarse texture.
    """
    size = layers.size
    out = np.zeros((size, size), np.float32)
    rng = np.random.default_rng(seed + 11)
    for lung_id, u, v, rad, dens in patches:
        lung = an.right_lung if lung_id < 0.5 else an.left_lung
        x0, y0 = lung.min(0)
        x1, y1 = lung.max(0)
        cx, cy = x0 + u * (x1 - x0), y0 + v * (y1 - y0)
        blob = np.zeros((size, size), np.float32)
        for _ in range(4):  # a few overlapping ellipses make an irregular patch
            ox, oy = rng.normal(0, 0.4 * rad, 2)
            rx, ry = rad * rng.uniform(0.5, 1.0, 2)
            cv2.ellipse(blob, (int((cx + ox) * size * 16), int((cy + oy) * size * 16)),
                        (max(1, int(rx * size * 16)), max(1, int(ry * size * 16))),
                        float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA, SHIFT)
        blob = _blur(blob, 0.35 * rad)
        tex = 0.75 + 0.25 * _texture(int(rng.integers(1 << 30)), size)
        out = np.maximum(out, np.clip(dens * blob * tex, 0.0, 1.0))
    return out * (layers.raw > 0)


def compose_realistic(an: Anatomy, layers: Layers, parents: StudyParents,
                      noise: ExogenousNoise) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation and gold mask of the realistic regime (body frame).

    Fluid is as dense as soft tissue, so the hemidiaphragm and the costophrenic angle
    vanish behind it; its upper edge (meniscus) is soft over several pixels. In a share
    of inpatient and portable studies the fluid layers behind the lung (supine or
    semi-erect) as a haze that thickens towards the base, without a meniscus.
    Consolidation and atelectasis patches replace lung air but stay inside the gold
    mask; fluid-covered lung leaves it where the fluid fraction exceeds the annotator's
    threshold (0.1-0.9, exogenous noise: the hidden border is uncertain), and the
    annotator draws every outline up to 2 px (at 128 px) inside or outside the border.
    """
    ex = noise.extra
    fluid = np.zeros_like(layers.base)
    if parents.effusion:
        layering_share = 0.6 if (parents.care == "inpatient" or parents.style == "portable") \
            else 0.35
        if ex.layering < layering_share:
            fluid = layering_fluid(an, layers, noise.effusion)
        else:
            fluid = fluid_map(an, layers, noise.effusion, realistic=True)
    soft = _blur(fluid, 0.035)
    opac = _opacities(an, layers, ex.opacities, ex.device_seed) if ex.opacities else 0.0
    keep = (1.0 - soft) * (1.0 - opac)
    atten = layers.base - layers.lung * keep + 0.04 * soft * layers.lung_depth
    mask = layers.aerated
    if parents.effusion:
        hidden = fluid > 0.1 + 0.8 * ex.annotator
        mask = largest_parts(np.where(hidden, 0, layers.aerated).astype(np.uint8))
    return atten.astype(np.float32), annotator_margin(mask, 2.0 * ex.margin * layers.size / 128)


def annotator_margin(mask: np.ndarray, offset_px: float) -> np.ndarray:
    """Move each lung's outline outwards (``offset_px`` > 0) or inwards by a sub-pixel
    distance: an annotator who draws on or inside the border. ``(S, S)`` uint8 0/1/2."""
    if abs(offset_px) < 0.05:
        return mask.copy()
    out = np.zeros_like(mask)
    for lab in (1, 2):
        m = (mask == lab).astype(np.uint8)
        if offset_px < 0:
            keep = cv2.distanceTransform(m, cv2.DIST_L2, 5) > -offset_px
        else:
            keep = cv2.distanceTransform(1 - m, cv2.DIST_L2, 5) <= offset_px
        out[keep & (out == 0)] = lab
    return out


def layering_fluid(an: Anatomy, layers: Layers, noise: EffusionNoise) -> np.ndarray:
    """Layering effusion: fluid fraction ``(S, S)`` rising smoothly towards the base."""
    xs, _ = grid(layers.size)
    fluid = np.zeros((layers.size, layers.size), np.float32)
    for side, sev in fluid_sides(noise).items():
        lung = an.right_lung if side == "right" else an.left_lung
        label = 1 if side == "right" else 2
        w = layering_weight(lung, sev, xs)
        fluid = np.maximum(fluid, w * (layers.raw == label))
    return fluid


def compose(an: Anatomy, layers: Layers, effusion: bool,
            noise: EffusionNoise) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation ``(S, S)`` float32 and gold mask ``(S, S)`` uint8 (body frame)."""
    if not effusion:
        return layers.base - layers.lung, layers.aerated.copy()
    fluid = fluid_map(an, layers, noise)
    soft = _blur(fluid, 0.003)
    atten = layers.base - layers.lung * (1.0 - soft) + 0.06 * soft * layers.lung_depth
    mask = largest_parts(np.where(fluid > 0.5, 0, layers.aerated).astype(np.uint8))
    return atten.astype(np.float32), mask
