"""Patient geometry of the phantom in normalised body-frame coordinates.

All coordinates are ``(x, y)`` in [0, 1] of the image width/height, x to the
image right (the patient's left in a PA view), y down. Nothing here depends on
the image size; :mod:`.render` rasterises it at any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from pcl_viewer.data.phantom.noise import ExogenousNoise, StudyParents
from pcl_viewer.data.phantom.shape import N_PER_LUNG, SEGMENTS, ShapeModel

MIDLINE = 0.5
LUNG_SCALE = 2.9  # aligned-frame units -> image fraction (joint lung width ~0.72)
LUNG_CENTRE_Y = 0.47


@lru_cache(maxsize=1)
def default_shape_model() -> ShapeModel:
    """The committed lung SSM (resources/priors/lung_shape_model.json)."""
    from pcl_viewer.paths import priors_dir

    return ShapeModel.load(priors_dir() / "lung_shape_model.json")


@dataclass
class Anatomy:
    """Geometry of one patient in one study (before the study's pose).

    Polylines are ``(P, 2)`` float arrays; ``vessels`` is ``(V, 5)`` rows
    ``x0, y0, x1, y1, width``; ribs are ``(R, P, 2)`` stacks of polylines.
    """

    right_lung: np.ndarray
    left_lung: np.ndarray
    heart: np.ndarray
    mediastinum: np.ndarray
    knob: tuple[float, float, float]
    trachea: list[np.ndarray]
    ribs_posterior: np.ndarray
    ribs_anterior: np.ndarray
    clavicles: list[np.ndarray]
    scapulae: list[np.ndarray]
    vessels: np.ndarray
    thorax_half_width: float
    neck_half_width: float
    shoulder_y: float
    soft_tissue: float
    spine_width: float
    vertebra_period: float
    vertebra_phase: float
    bone_density: float
    gastric: tuple[float, float, float, float] | None
    breasts: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    lung_bottom: dict[str, float] = field(default_factory=dict)
    hila: list[tuple[float, float]] = field(default_factory=list)


def lateral_x(lung: np.ndarray, y: float | np.ndarray) -> np.ndarray:
    """x of a lung's lateral wall (landmarks apex -> costophrenic angle) at height(s) ``y``."""
    wall = lung[: SEGMENTS[0] + 1]
    order = np.argsort(wall[:, 1])
    return np.interp(y, wall[order, 1], wall[order, 0])


def _lungs(noise: ExogenousNoise, parents: StudyParents, ssm: ShapeModel):
    p = noise.patient
    pts = ssm.instance(np.asarray(p.shape))
    scale = LUNG_SCALE * (1.03 if parents.sex == "male" else 0.97)
    pts = pts * scale + np.array([MIDLINE, LUNG_CENTRE_Y])
    right, left = pts[:N_PER_LUNG].copy(), pts[N_PER_LUNG:].copy()
    # inspiration stretches lungs downwards from the apices
    insp = inspiration(noise)
    for lung in (right, left):
        top = lung[:, 1].min()
        lung[:, 1] = top + (lung[:, 1] - top) * insp
    # the right hemidiaphragm sits 1-2 cm above the left (liver below it)
    lift = 0.022 + 0.008 * np.tanh(p.right_dome)
    top, bot = right[:, 1].min(), right[:, 1].max()
    ramp = np.clip((right[:, 1] - top) / max(bot - top, 1e-6), 0, 1) ** 2
    right[:, 1] -= lift * ramp
    shift = left[:, 1].max() - right[:, 1].max()
    if shift < 0.012:
        right[:, 1] -= (0.012 - shift) * ramp
    return right, left


def inspiration(noise: ExogenousNoise) -> float:
    """Vertical stretch of the lungs by inspiration depth (realistic: shallow to deep)."""
    amp = 0.09 if noise.regime == "realistic" else 0.045
    return 1.0 + amp * float(np.tanh(noise.study.inspiration / 1.5))


def cardiothoracic_ratio(noise: ExogenousNoise, parents: StudyParents) -> float:
    """Widest heart / widest thorax: about 0.40-0.50 in normals; with cardiomegaly
    (realistic regime) 0.52-0.65; a portable AP study magnifies the heart by 13 %."""
    ctr = 0.44 + 0.03 * np.tanh(noise.patient.heart / 1.5) + 0.0006 * (parents.age - 55)
    ex = noise.extra
    if noise.regime == "realistic" and ex is not None and ex.cardiomegaly:
        ctr = max(ctr, 0.52 + 0.13 * ex.heart_extra)
    if parents.style == "portable":
        ctr *= 1.13  # AP projection magnifies the heart
    return float(ctr)


def chaikin(poly: np.ndarray, iterations: int) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon ``(P, 2)``."""
    for _ in range(iterations):
        nxt = np.roll(poly, -1, axis=0)
        poly = np.stack([0.75 * poly + 0.25 * nxt, 0.25 * poly + 0.75 * nxt], 1).reshape(-1, 2)
    return poly


def _heart(right, left, noise, parents):
    ctr = cardiothoracic_ratio(noise, parents)
    thorax = float(left[:, 0].max() - right[:, 0].min())
    wh = ctr * thorax
    base = float(0.5 * (right[SEGMENTS[0] + SEGMENTS[1], 1] + left[SEGMENTS[0] + SEGMENTS[1], 1]))
    hh = 0.78 * wh
    # control polygon (clockwise from the top of the right border), smoothed by Chaikin
    ctrl = np.array([
        [-0.045, -hh], [-0.055, -0.62 * hh], [-0.24 * wh, -0.42 * hh], [-0.33 * wh, -0.2 * hh],
        [-0.30 * wh, 0.05], [0.62 * wh, 0.05], [0.70 * wh, -0.04 * hh],
        [0.66 * wh, -0.36 * hh], [0.44 * wh, -0.70 * hh], [0.20 * wh, -0.88 * hh],
        [0.05, -hh]]) + np.array([MIDLINE, base])
    heart = chaikin(ctrl, 3)
    top = float(base - hh)
    return heart, wh, top, base


def _mediastinum(heart_top: float, base: float, age: float):
    y = np.array([0.0, 0.16, heart_top + 0.02, base])
    wr = np.array([0.042, 0.045, 0.055, 0.06])  # half-widths to the image left
    wl = np.array([0.040, 0.045, 0.050, 0.05])
    poly = np.concatenate([np.stack([MIDLINE - wr, y], 1), np.stack([MIDLINE + wl, y], 1)[::-1]])
    r = 0.03 + 0.0002 * max(age - 40, 0)
    knob = (MIDLINE + 0.03 + r * 0.5, heart_top - 0.03, r)
    return poly, knob


def _ribs(right, left, noise, parents, insp):
    """Posterior and anterior ribs of both sides as ``(2, K, P, 2)`` polylines (vectorised)."""
    p = noise.patient
    top = min(right[:, 1].min(), left[:, 1].min())
    bottom = max(right[:, 1].max(), left[:, 1].max())
    dy = (bottom - top) / (9.4 * insp)
    tilt = 0.01 * np.tanh(p.rib_angle)
    k = np.arange(11, dtype=np.float64)
    y0 = top - 0.03 + (k + 0.6 * p.rib_phase) * dy * (0.8 + 0.035 * k)
    t = np.linspace(0.0, 1.0, 14)[None, :]
    ta = np.linspace(0.0, 1.0, 8)[None, :]
    posterior, anterior = [], []
    for lung, sgn in ((right, -1.0), (left, 1.0)):
        ylat = np.clip(y0 + 0.03 + 0.01 * k, lung[:, 1].min(), lung[:, 1].max())
        half = np.abs(lateral_x(lung, ylat) - MIDLINE) + 0.035
        x = MIDLINE + sgn * (0.028 + t * (half[:, None] - 0.028))
        y = (y0[:, None] - (0.05 - tilt) * np.sin(np.pi * 0.75 * t)
             + (0.07 + 0.004 * k[:, None]) * t**4)
        posterior.append(np.stack([x, y], -1))
        xa0, ya0 = x[:, -1:], y[:, -1:]
        xa1 = MIDLINE + sgn * (0.09 + 0.008 * k[:, None])
        xa = xa0 + (xa1 - xa0) * ta
        ya = ya0 + (0.08 + 0.006 * k[:, None]) * ta - 0.03 * np.sin(np.pi * ta) + 0.02 * ta**2
        anterior.append(np.stack([xa, ya], -1))
    return np.concatenate(posterior), np.concatenate(anterior), dy


def _clavicles(right, left):
    out = []
    top = min(right[:, 1].min(), left[:, 1].min())
    for sgn in (-1.0, 1.0):
        t = np.linspace(0, 1, 16)
        x = MIDLINE + sgn * (0.045 + 0.30 * t)
        y = top + 0.06 - 0.07 * t + 0.012 * np.sin(2 * np.pi * t)
        out.append(np.stack([x, y], 1))
    return out


def _scapulae(right, left, half_width):
    out = []
    top = min(right[:, 1].min(), left[:, 1].min())
    for sgn in (-1.0, 1.0):
        xo = MIDLINE + sgn * (half_width - 0.02)
        out.append(np.array([[xo - sgn * 0.06, top + 0.02], [xo, top + 0.01],
                             [xo + sgn * 0.005, top + 0.30], [xo - sgn * 0.045, top + 0.12]]))
    return out


def _vessel_tree(lung: np.ndarray, sgn: float, rng: np.random.Generator):
    """Branching vessel segments ``(V, 5)`` from the hilum of one lung, tapering outwards,
    and the hilum centre ``(x, y)``."""
    top, bot = lung[:, 1].min(), lung[:, 1].max()
    hy = top + (0.43 if sgn > 0 else 0.47) * (bot - top)
    medial = lung[SEGMENTS[0] + SEGMENTS[1]:]
    order = np.argsort(medial[:, 1])
    hx = float(np.interp(hy, medial[order, 1], medial[order, 0])) - sgn * 0.005
    n0 = 7
    x = np.full(n0, hx)
    y = np.full(n0, hy) + rng.normal(0, 0.01, n0)
    a = np.deg2rad(np.linspace(-70, 80, n0) + rng.normal(0, 6, n0))
    length = 0.07 * rng.uniform(0.8, 1.15, n0)
    w = np.full(n0, 0.014)
    segs = []
    for _depth in range(4):
        x1 = x + sgn * np.cos(a) * length
        y1 = y + np.sin(a) * length
        segs.append(np.stack([x, y, x1, y1, w], 1))
        m = len(x) * 2
        x, y = np.repeat(x1, 2), np.repeat(y1, 2)
        side = np.tile([-1.0, 1.0], len(x1))
        a = np.repeat(a, 2) + side * np.deg2rad(rng.uniform(14, 32, m)) + rng.normal(0, 0.08, m)
        length = np.repeat(length, 2) * rng.uniform(0.6, 0.78, m)
        w = np.repeat(w, 2) * 0.62
    return np.concatenate(segs), (hx - sgn * 0.015, hy)


def _bone_density(noise: ExogenousNoise, parents: StudyParents) -> float:
    """Bone contrast: falls with age; in the realistic regime it also varies per study."""
    d = 1.0 - 0.004 * max(parents.age - 50, 0)
    if noise.regime == "realistic" and noise.extra is not None:
        d *= 1.0 + 0.3 * float(np.tanh(noise.extra.look[8]))
    return float(d)


def build_anatomy(noise: ExogenousNoise, parents: StudyParents,
                  ssm: ShapeModel | None = None) -> Anatomy:
    """Geometry of the patient of ``noise`` as seen in this study (style only matters for
    ``portable``, whose AP projection magnifies the heart)."""
    ssm = ssm or default_shape_model()
    p = noise.patient
    male = parents.sex == "male"
    right, left = _lungs(noise, parents, ssm)
    insp = inspiration(noise)
    heart, _, heart_top, base = _heart(right, left, noise, parents)
    mediastinum, knob = _mediastinum(heart_top, base, parents.age)
    rib_p, rib_a, dy = _ribs(right, left, noise, parents, insp)
    lung_half = max(MIDLINE - right[:, 0].min(), left[:, 0].max() - MIDLINE)
    half_width = lung_half + 0.045 + 0.02 * np.tanh(p.body_width) + (0.01 if male else 0.0)
    top = min(right[:, 1].min(), left[:, 1].min())
    tree_rng = np.random.default_rng(p.vessel_seed)
    (vr, hr), (vl, hl) = _vessel_tree(right, -1.0, tree_rng), _vessel_tree(left, 1.0, tree_rng)
    vessels = np.concatenate([vr, vl])
    trachea_bottom = heart_top - 0.02
    carina = np.array([MIDLINE + 0.003, trachea_bottom])
    trachea = [np.array([[MIDLINE, 0.0], carina]),
               np.array([carina, carina + [-0.045, 0.05]]),
               np.array([carina, carina + [0.05, 0.06]])]
    gastric = None
    if p.gastric > 0.25:
        lb = left[SEGMENTS[0]: SEGMENTS[0] + SEGMENTS[1] + 1]
        gx = float(lb[:, 0].mean() - 0.01)
        gy = float(lb[:, 1].max()) + 0.035
        gastric = (gx, gy, 0.03 + 0.035 * p.gastric, 0.022 + 0.012 * p.gastric)
    breasts = []
    if not male:
        size = 0.15 + 0.025 * np.tanh(p.breast)
        for lung, sgn in ((right, -1.0), (left, 1.0)):
            bx = MIDLINE + sgn * 0.20
            by = float(lung[:, 1].max()) - 0.04
            breasts.append((bx, by, size * 1.15, size, 0.16 + 0.06 * np.tanh(p.breast)))
    return Anatomy(
        right_lung=right, left_lung=left, heart=heart, mediastinum=mediastinum, knob=knob,
        trachea=trachea, ribs_posterior=rib_p, ribs_anterior=rib_a, clavicles=_clavicles(right, left),
        scapulae=_scapulae(right, left, half_width), vessels=vessels,
        thorax_half_width=float(half_width), neck_half_width=0.075 + (0.01 if male else 0.0),
        shoulder_y=float(top - 0.03), soft_tissue=float(0.9 + 0.1 * np.tanh(p.soft_tissue)),
        spine_width=0.068 + (0.006 if male else 0.0), vertebra_period=float(dy * 0.92),
        vertebra_phase=float(p.rib_phase), bone_density=_bone_density(noise, parents),
        gastric=gastric, breasts=breasts,
        lung_bottom={"right": float(right[:, 1].max()), "left": float(left[:, 1].max())},
        hila=[hr, hl],
    )
