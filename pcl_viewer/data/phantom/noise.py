"""Exogenous noise of the phantom SCM and the values of its parents.

Everything random about one image lives in :class:`ExogenousNoise`: the
patient's anatomy (shared by all studies of a patient), the study's
acquisition, and the effusion's side and severity. The effusion noise is
always sampled, so ``do(effusion=present)`` is defined for every image.
Given the noise and :class:`StudyParents`, rendering is deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace

import numpy as np

from pcl_viewer.parents import PHANTOM_STYLES, Parents

EFFUSION_SIDES: tuple[str, ...] = ("right", "left", "bilateral")
#: P(side) of an effusion: more often right, sometimes bilateral.
EFFUSION_SIDE_P: tuple[float, ...] = (0.55, 0.33, 0.12)
#: Severity of an effusion in the realistic regime: Beta(a, b) on [0, 1] (most effusions
#: are small or moderate, a tail reaches most of the hemithorax).
SEVERITY_BETA: tuple[float, float] = (2.0, 1.3)
#: Number of appearance-jitter draws per study (see :mod:`.acquisition`).
N_LOOK = 10


@dataclass
class PatientNoise:
    """Anatomy of one patient (standard normal unless noted)."""

    shape: list[float]  # (K,) SSM coefficients in units of each mode's std, clipped to +-2
    heart: float  # cardiothoracic ratio deviation
    body_width: float
    soft_tissue: float  # habitus: soft-tissue thickness
    breast: float  # breast size (rendered for women only)
    right_dome: float  # extra elevation of the right hemidiaphragm
    rib_phase: float  # uniform [0, 1): vertical phase of the rib cage
    rib_angle: float
    gastric: float  # uniform [0, 1): gastric bubble size (small values: no bubble)
    vessel_seed: int  # seeds the vessel tree and parenchymal texture

    @classmethod
    def sample(cls, rng: np.random.Generator, n_modes: int) -> PatientNoise:
        n = rng.standard_normal
        return cls(
            shape=[round(float(v), 5) for v in np.clip(n(n_modes), -2.0, 2.0)],
            heart=float(n()), body_width=float(n()), soft_tissue=float(n()),
            breast=float(n()), right_dome=float(n()), rib_phase=float(rng.random()),
            rib_angle=float(n()), gastric=float(rng.random()),
            vessel_seed=int(rng.integers(0, 2**31 - 1)),
        )


@dataclass
class StudyNoise:
    """Acquisition of one study (standard normal unless noted)."""

    rotation: float
    shift_x: float
    shift_y: float
    scale: float
    inspiration: float
    exposure: float
    acq_seed: int  # seeds quantum/detector noise and line placement
    collimation: list[float]  # 4 x uniform [0, 1): top, bottom, left, right margins
    marker: float  # uniform [0, 1): side-marker placement

    @classmethod
    def sample(cls, rng: np.random.Generator) -> StudyNoise:
        n = rng.standard_normal
        return cls(
            rotation=float(n()), shift_x=float(n()), shift_y=float(n()), scale=float(n()),
            inspiration=float(n()), exposure=float(n()),
            acq_seed=int(rng.integers(0, 2**31 - 1)),
            collimation=[float(v) for v in rng.random(4)], marker=float(rng.random()),
        )


@dataclass
class EffusionNoise:
    """Where and how much fluid there would be, were the effusion present."""

    side: str  # one of EFFUSION_SIDES
    severity: float  # [0, 1]: 0 = blunted angle only, 1 = most of the hemithorax
    meniscus: float  # standard normal: curvature of the meniscus

    @classmethod
    def sample(cls, rng: np.random.Generator, severe: bool = False) -> EffusionNoise:
        side = EFFUSION_SIDES[int(rng.choice(3, p=EFFUSION_SIDE_P))]
        u = float(rng.random())
        severity = 0.45 + 0.55 * u if severe else u
        return cls(side=side, severity=severity, meniscus=float(rng.standard_normal()))


@dataclass
class ExtraNoise:
    """Exogenous noise that only the ``realistic`` regime uses (standard normal unless noted).

    Drawn from its own random stream, so the ``easy`` regime's images are those of the
    earlier renderer, seed for seed.
    """

    cardiomegaly: bool  # drawn from P(cardiomegaly | age, sex, effusion) of PadChest
    heart_extra: float  # uniform [0, 1): how far above normal an enlarged heart is
    layering: float  # uniform [0, 1): below the care setting's share -> layering haze
    aeration: float  # lung air content (low values: poorly aerated, low contrast)
    veil: float  # uniform [0, 1): strength of the scatter veil
    opacities: list[list[float]]  # per patch: lung (0 right / 1 left), u, v in [0, 1], size, density
    devices: list[str]  # subset of DEVICES
    device_seed: int
    look: list[float]  # N_LOOK standard normals: per-study deviations of the scanner's look
    # uniform [0, 1): where the annotator puts the border of lung hidden by fluid (the
    # fluid fraction above which lung is no longer labelled, 0.25-0.75): labels are
    # uncertain where the border is hidden, as annotators disagree on real films
    annotator: float = 0.5
    # uniform [-1, 1]: how tightly the annotator draws the lung outline (inside or
    # outside the true border by up to 2 px at 128 px): inter-annotator variation
    margin: float = 0.0

    @classmethod
    def sample(cls, rng: np.random.Generator, *, cardiomegaly: bool, inpatient: bool,
               portable: bool) -> ExtraNoise:
        n = rng.standard_normal
        k = int(rng.poisson(2.0 if (inpatient or portable) else 1.2))
        opac = [[float(rng.integers(0, 2)), float(rng.uniform(0.1, 0.9)),
                 float(rng.beta(2.0, 1.6)), float(rng.uniform(0.05, 0.18)),
                 float(rng.uniform(0.3, 1.0))] for _ in range(k)]
        sick = 1.0 if (inpatient or portable) else 0.0
        probs = {"ecg": 0.12 + 0.5 * sick, "line": 0.03 + 0.35 * sick,
                 "tube": 0.01 + 0.25 * sick, "pacemaker": 0.03 + 0.05 * sick,
                 "text": 0.5, "clips": 0.05}
        devices = [d for d in DEVICES if rng.random() < probs[d]]
        return cls(cardiomegaly=bool(cardiomegaly), heart_extra=float(rng.random()),
                   layering=float(rng.random()), aeration=float(n()), veil=float(rng.random()),
                   opacities=opac, devices=devices,
                   device_seed=int(rng.integers(0, 2**31 - 1)),
                   look=[round(float(v), 5) for v in n(N_LOOK)], annotator=float(rng.random()),
                   margin=float(rng.uniform(-1.0, 1.0)))


#: Devices and burned-in items the realistic regime draws (in this order).
DEVICES: tuple[str, ...] = ("ecg", "line", "tube", "pacemaker", "text", "clips")


@dataclass
class ExogenousNoise:
    """All exogenous noise of one image (JSON-serialisable).

    ``regime`` is the look the noise is rendered with (``easy``: the first renderer;
    ``realistic``: harder, with :class:`ExtraNoise`). Records without it are ``easy``.
    """

    patient: PatientNoise
    study: StudyNoise
    effusion: EffusionNoise
    regime: str = "easy"
    extra: ExtraNoise | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (fast: the records are flat dataclasses)."""
        out: dict = {}
        names = ("patient", "study", "effusion") + (("extra",) if self.extra else ())
        for name in names:
            part = dict(vars(getattr(self, name)))
            for k, v in part.items():
                if isinstance(v, list):
                    part[k] = [list(x) if isinstance(x, list) else x for x in v]
            out[name] = part
        out["regime"] = self.regime
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ExogenousNoise:
        extra = ExtraNoise(**d["extra"]) if d.get("extra") else None
        return cls(PatientNoise(**d["patient"]), StudyNoise(**d["study"]),
                   EffusionNoise(**d["effusion"]), d.get("regime", "easy"), extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> ExogenousNoise:
        return cls.from_dict(json.loads(s))


@dataclass(frozen=True)
class StudyParents:
    """Values of the parents the renderer uses.

    ``style`` is the acquisition style (``philips``, ``imagingdynamics`` or the
    held-out ``portable``); ``sex`` is ``female``/``male``; ``age`` in years;
    ``care`` is ``outpatient``/``inpatient`` (it acts on the image only through
    scanner and effusion).
    """

    style: str
    sex: str
    effusion: bool
    age: float = 60.0
    care: str = "outpatient"

    def __post_init__(self) -> None:
        if self.style not in PHANTOM_STYLES:
            raise ValueError(f"unknown style {self.style!r}; expected one of {PHANTOM_STYLES}")
        if self.sex not in ("female", "male"):
            raise ValueError(f"sex must be 'female' or 'male', got {self.sex!r}")

    def intervene(self, do: dict) -> StudyParents:
        """Apply ``do`` with keys ``scanner``/``style``, ``effusion``, ``sex``, ``age``.

        Effusion accepts bool or ``present``/``absent``; scanner/style any style name.
        """
        kw: dict = {}
        for key, value in do.items():
            if key in ("scanner", "style"):
                kw["style"] = str(value)
            elif key == "effusion":
                kw["effusion"] = value if isinstance(value, bool) else value == "present"
            elif key in ("sex", "age", "care"):
                kw[key] = value
            else:
                raise ValueError(f"cannot intervene on {key!r}")
        return replace(self, **kw)

    def to_parents(self) -> Parents:
        """The model's binary parents; raises ValueError for the ``portable`` style."""
        return Parents(scanner=self.style, sex=self.sex,
                       effusion="present" if self.effusion else "absent")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
